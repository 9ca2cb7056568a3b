"""The tokenizer mlcc builds from GGUF metadata must give llama.cpp's token ids.

Checked against stored llama.cpp output (tests/fixtures, made by tests/make_llamacpp_fixtures.py) and, when
llama-cpp-python is installed, against llama.cpp live.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.real_model
FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_STRINGS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "multiple   spaces\tand\ttabs\nand\n\nnewlines",
    "Numbers: 0 7 42 1234567890 3.14159 -17 1e-5",
    "Unicode: naïve café Straße Ελληνικά русский 中文 日本語 한국어",
    "Emoji: 🎉🚀👍🏽 👨‍👩‍👧‍👦 ❤️",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))",
    "<|im_start|>user\nWhat's up?<|im_end|>\n<|im_start|>assistant\n",
    "It's a dog's life; they'll say we've done it, don't they?",
    "URL: https://example.com/path?q=1&r=two#frag",
]


@pytest.fixture(scope="module")
def smollm_tokenizer(tmp_path_factory):
    from test_real_models import smollm_gguf

    from compiler.gguf_source import GGUFSource
    from runtime.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("tok")
    info = GGUFSource(smollm_gguf()).write_tokenizer(folder)
    return Tokenizer(folder, info, info["chat_template"])


@pytest.mark.skipif(not (FIXTURES / "smollm2_llamacpp.npz").is_file(), reason="no llama.cpp fixtures")
def test_smollm2_tokenizer_matches_stored_llamacpp(smollm_tokenizer):
    ref = np.load(FIXTURES / "smollm2_llamacpp.npz")
    for i, text in enumerate(TOKENIZER_STRINGS):
        assert smollm_tokenizer.encode(text) == ref[f"tok_{i}"].tolist(), text


def test_smollm2_tokenizer_matches_live_llamacpp(smollm_tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp")
    from test_real_models import smollm_gguf

    llm = llama_cpp.Llama(str(smollm_gguf()), vocab_only=True, verbose=False)
    for text in TOKENIZER_STRINGS:
        assert smollm_tokenizer.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True), text
        if "<|" not in text:  # special tokens are left out of decoded text
            assert smollm_tokenizer.decode(smollm_tokenizer.encode(text)) == text
