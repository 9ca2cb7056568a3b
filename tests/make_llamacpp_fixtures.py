"""Make the llama.cpp reference fixtures the real-model tests read, so CI needs no llama.cpp build.

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
        pip install llama-cpp-python==0.3.36       # builds llama.cpp (~10-18 min on 2 cores)
    python tests/make_llamacpp_fixtures.py

llama.cpp is built for AVX2 (not -march=native): on an AVX-512 CPU a native build takes other code paths with
other summation orders, and mlcc reproduces the AVX2 ones.

For each prompt: llama.cpp's token ids, the argmax at every position, the last-token logits (float16), the
sha256 of all positions' float32 logits (to check bit-identical output) and a 64-token greedy continuation;
llama.cpp's greedy chat reply to one question (models with a chat template); and llama.cpp's token ids for a
set of tokenizer test strings. llama.cpp runs with its defaults (float16 K/V, no flash attention), 2 threads.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
from llama_cpp import Llama

sys.path.insert(0, str(Path(__file__).parent))
from test_real_models import CHAT, CHAT_TOKENS, MODELS, PROMPTS  # noqa: E402
from test_tokenizer_llamacpp import TOKENIZER_STRINGS  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def greedy(llm: Llama, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def chat_template_of(llm: Llama) -> str | None:
    return llm.metadata.get("tokenizer.chat_template")


def make(gguf: Path, name: str) -> None:
    llm = Llama(str(gguf), logits_all=True, n_ctx=512, n_threads=2, verbose=False)
    arrays: dict[str, np.ndarray] = {}
    for i, prompt in enumerate(PROMPTS):
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)], dtype=np.float32)
        arrays[f"ids_{i}"] = np.array(ids)
        arrays[f"argmax_{i}"] = scores.argmax(-1)
        arrays[f"last_{i}"] = scores[-1].astype(np.float16)
        arrays[f"sha_{i}"] = np.array(hashlib.sha256(np.ascontiguousarray(scores).tobytes()).hexdigest())
        arrays[f"greedy_{i}"] = np.array(greedy(llm, ids, 64))
    if chat_template_of(llm):
        reply = llm.create_chat_completion(CHAT, temperature=0, max_tokens=CHAT_TOKENS)
        arrays["chat_reply"] = np.array(reply["choices"][0]["message"]["content"])
    for i, text in enumerate(TOKENIZER_STRINGS):
        arrays[f"tok_{i}"] = np.array(llm.tokenize(text.encode(), add_bos=False, special=True), dtype=np.int64)
    FIXTURES.mkdir(exist_ok=True)
    np.savez_compressed(FIXTURES / f"{name}_llamacpp.npz", **arrays)
    print(f"wrote {FIXTURES / f'{name}_llamacpp.npz'}")


if __name__ == "__main__":
    for name, find in MODELS.items():
        make(find(), name)
