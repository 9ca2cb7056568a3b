"""Prefill and decode speed of an artifact on this machine (used by `mlcc bench` and bench/cpu.py)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from runtime.engine import Engine
from runtime.sampler import SamplingParams

TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange "
    "grain, salt and cloth. Over the centuries the settlement grew into a market town, then a city with walls, "
    "churches, a university and a harbour. "
)
PREFILL_LENGTHS = (128, 512)
DECODE_TOKENS = 128


def prompt_ids(tokenize: Callable[[str], list[int]], n: int) -> list[int]:
    """Exactly n tokens of English text."""
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenize(TEXT)
    return ids[:n]


def measure(artifact: str, threads: int, runs: int = 5) -> dict[str, float]:
    """Tokens/s: prefill of 128- and 512-token prompts (those that fit the context), decode of 128 tokens;
    medians of `runs`."""
    engine = Engine(artifact, verify=False, max_batch_size=1, kv_cache_tokens=2048, threads=threads)
    results: dict[str, float] = {}
    for n in (n for n in PREFILL_LENGTHS if n < engine.context_window):
        ids = prompt_ids(engine.tokenizer.encode, n)
        engine.prefill_logits([ids])  # warm-up
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            engine.prefill_logits([ids])
            times.append(time.perf_counter() - start)
        results[f"prefill {n}"] = n / statistics.median(times)
    ids = prompt_ids(engine.tokenizer.encode, 16)
    rates = []
    for _ in range(runs):  # decode time = (prefill + 129 tokens) - (prefill + 1 token)
        start = time.perf_counter()
        engine.generate_ids([ids], SamplingParams(max_tokens=1, temperature=0))
        first = time.perf_counter() - start
        start = time.perf_counter()
        params = SamplingParams(max_tokens=DECODE_TOKENS + 1, temperature=0, ignore_eos=True)
        generated = len(engine.generate_ids([ids], params)[0].token_ids)  # fewer in a small context window
        rates.append((generated - 1) / (time.perf_counter() - start - first))
    results[f"decode {DECODE_TOKENS}"] = statistics.median(rates)
    return results
