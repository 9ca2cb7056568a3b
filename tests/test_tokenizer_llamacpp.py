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
def gguf_tokenizer(tmp_path_factory):
    from test_real_models import MODELS

    from compiler.gguf_source import GGUFSource
    from runtime.tokenizer import Tokenizer

    made = {}

    def get(name: str) -> Tokenizer:
        if name not in made:
            folder = tmp_path_factory.mktemp(f"tok-{name}")
            info = GGUFSource(MODELS[name]()).write_tokenizer(folder)
            made[name] = Tokenizer(folder, info, info["chat_template"])
        return made[name]

    return get


@pytest.mark.parametrize("name", ["gemma3", "smollm2"])
def test_tokenizer_matches_stored_llamacpp(name, gguf_tokenizer):
    path = FIXTURES / f"{name}_llamacpp.npz"
    if not path.is_file():
        pytest.skip(f"no llama.cpp fixtures for {name}")
    ref = np.load(path)
    tokenizer = gguf_tokenizer(name)
    for i, text in enumerate(TOKENIZER_STRINGS):
        assert tokenizer.encode(text, add_special_tokens=False) == ref[f"tok_{i}"].tolist(), text


@pytest.mark.parametrize("name", ["gemma3", "smollm2"])
def test_tokenizer_matches_live_llamacpp(name, gguf_tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp")
    from test_real_models import MODELS

    llm = llama_cpp.Llama(str(MODELS[name]()), vocab_only=True, verbose=False)
    tokenizer = gguf_tokenizer(name)
    for text in TOKENIZER_STRINGS:
        ours = tokenizer.encode(text, add_special_tokens=False)
        assert ours == llm.tokenize(text.encode(), add_bos=False, special=True), text
        if "<|" not in text:  # special tokens are left out of decoded text
            assert tokenizer.decode(ours) == text


@pytest.mark.parametrize("name", ["gemma3", "smollm2"])
def test_streamed_pieces_join_to_the_decoded_text(name, gguf_tokenizer):
    """However long the output, each token decodes a few ids (the window slides) and the pieces join to the text
    of all of them: multi-byte characters split across tokens, SentencePiece's spaces, code."""
    from runtime.tokenizer import IncrementalDecoder

    tokenizer = gguf_tokenizer(name)
    prompt = tokenizer.encode("Tell me a story.", add_special_tokens=False)
    ids = tokenizer.encode(" ".join(TOKENIZER_STRINGS[:7] * 6), add_special_tokens=False)
    decoder = IncrementalDecoder(tokenizer, prompt)
    pieces = []
    for token in ids:
        pieces.append(decoder.add(token))
        assert len(decoder.ids) <= IncrementalDecoder.WINDOW + 3  # + the bytes of a character still incomplete
    context = prompt[-IncrementalDecoder.CONTEXT :]
    assert len(ids) > 10 * IncrementalDecoder.WINDOW
    assert "".join(pieces) == tokenizer.decode(context + ids)[len(tokenizer.decode(context)) :]
