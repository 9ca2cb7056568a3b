"""Per-token cost of structured-output masks: llguidance (what mlcc uses) and xgrammar, side by side.

Each library follows the tokens of a valid output (tokenized with the model's own tokenizer), computing the
full-vocabulary mask before every token, as the engine does. Prints the constraint's compile time and the
per-token mask time (median, mean, 99th percentile) for each constraint and library that is installed:

    python bench/structured_mask.py ARTIFACT_OR_TOKENIZER_JSON

xgrammar is optional here (it needs torch, transformers and triton, so mlcc does not depend on it).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "height_m": {"type": "number"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
            "required": ["street", "city"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "height_m", "role", "address", "tags"],
    "additionalProperties": False,
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "height_m": 1.65,
    "role": "admin",
    "address": {"street": "12 St James's Square", "city": "London"},
    "tags": ["mathematics", "engines", "poetry"],
}
REGEX = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z, (info|warn|error): [a-z ]{10,60}\."
REGEX_TEXT = "2026-12-03T12:34:56Z, warn: the disk is almost full."
CASES = {
    "json_schema": (json.dumps(SCHEMA), json.dumps(INSTANCE, separators=(", ", ": "))),
    "regex": (REGEX, REGEX_TEXT),
}


def llguidance_run(
    tokenizer_json: str, vocab: int, kind: str, source: str, ids: list[int]
) -> tuple[float, list[float]]:
    import llguidance
    from llguidance import LLMatcher, LLTokenizer
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    lltok = LLTokenizer(tokenizer_json, n_vocab=vocab)
    start = time.perf_counter()
    if kind == "json_schema":
        grammar = LLMatcher.grammar_from_json_schema(
            source, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        )
    else:
        grammar = llguidance.grammar_from("regex", source)
    matcher = LLMatcher(lltok, grammar, log_level=0)
    compile_s = time.perf_counter() - start
    mask = allocate_token_bitmask(1, vocab)
    times = []
    for token in ids:
        t = time.perf_counter()
        fill_next_token_bitmask(matcher, mask)
        times.append(time.perf_counter() - t)
        assert mask[0, token // 32] >> (token % 32) & 1, "the valid token was masked out"
        assert matcher.consume_token(token), matcher.get_error()
    return compile_s, times


def xgrammar_run(tokenizer_path: Path, vocab: int, kind: str, source: str, ids: list[int]) -> tuple[float, list[float]]:
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path))
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    start = time.perf_counter()
    if kind == "json_schema":
        compiled = compiler.compile_json_schema(source, any_whitespace=False, separators=(", ", ": "))
    else:
        compiled = compiler.compile_regex(source)
    matcher = xgrammar.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - start
    mask = xgrammar.allocate_token_bitmask(1, vocab)
    times = []
    for token in ids:
        t = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - t)
        assert int(mask[0, token // 32]) >> (token % 32) & 1, "the valid token was masked out"
        assert matcher.accept_token(token)
    return compile_s, times


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "tokenizer.json")
    path = path / "tokenizer.json" if path.is_dir() else path
    tokenizer = Tokenizer.from_file(str(path))
    vocab = tokenizer.get_vocab_size()
    print(f"tokenizer {path} ({vocab} tokens)")
    runners = {"llguidance": lambda *a: llguidance_run(tokenizer.to_str(), vocab, *a)}
    try:
        import xgrammar  # noqa: F401

        runners["xgrammar"] = lambda *a: xgrammar_run(path, vocab, *a)
    except ImportError:
        print("xgrammar is not installed: llguidance only")
    for kind, (source, text) in CASES.items():
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        for name, run in runners.items():
            run(kind, source, ids)  # warm up (lazy tables)
            compile_s, times = run(kind, source, ids)
            us = np.asarray(times) * 1e6
            print(
                f"{kind:12s} {name:11s} compile {compile_s * 1e3:7.2f} ms   mask per token:"
                f" median {np.median(us):7.1f} us  mean {us.mean():7.1f} us  p99 {np.percentile(us, 99):8.1f} us"
                f"  ({len(ids)} tokens)"
            )


if __name__ == "__main__":
    main()
