"""Prefill and decode speed of an artifact on this machine (used by `mlcc bench` and bench/cpu.py)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.engine import Engine
from runtime.sampler import SamplingParams

TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange "
    "grain, salt and cloth. Over the centuries the settlement grew into a market town, then a city with walls, "
    "churches, a university and a harbour. "
)
# What speculative decoding is measured on: a summary repeats much of its input (prompt lookup's best case).
PASSAGE = (
    "The lighthouse on the northern cape was built in 1858 to guide fishing boats past the reef. Its keeper lived "
    "in a stone cottage at the foot of the tower with his wife and three children. Every evening he climbed the "
    "one hundred and twelve steps to light the lamp, and every morning he climbed them again to trim the wick and "
    "polish the lens. In 1921 the lamp was converted to electricity, and in 1964 the last keeper left the cape. "
    "Today the cottage is a small museum, and the tower is still lit every night by an automatic lamp."
)
SUMMARY_REQUEST = "Summarise the following text, keeping its key facts and wording:\n\n"
PREFILL_LENGTHS = (128, 512)
DECODE_TOKENS = 128
LONG_CONTEXT = 2000  # prompt tokens before the long-context decode: attention reads a cache this long per token


def prompt_ids(tokenize: Callable[[str], list[int]], n: int) -> list[int]:
    """Exactly n tokens of English text."""
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenize(TEXT)
    return ids[:n]


def prefill_rate(engine: Engine, n: int, runs: int) -> float:
    """Tokens/s of prefilling an n-token prompt: the median of `runs`, after one warm-up."""
    ids = prompt_ids(engine.tokenizer.encode, n)
    engine.prefill_logits([ids])  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        engine.prefill_logits([ids])
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def decode_rate(engine: Engine, prompts: list[list[int]], runs: int) -> float:
    """Generated tokens/s of `prompts` decoded together, up to DECODE_TOKENS each: the median of `runs`, each
    (prefill + DECODE_TOKENS + 1 tokens) - (prefill + 1 token)."""
    one = SamplingParams(max_tokens=1, temperature=0)
    many = SamplingParams(max_tokens=DECODE_TOKENS + 1, temperature=0, ignore_eos=True)
    engine.generate_ids(prompts, one)  # warm-up: a long prompt's cached prefix then serves both calls of a run
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        engine.generate_ids(prompts, one)
        first = time.perf_counter() - start
        start = time.perf_counter()
        results = engine.generate_ids(prompts, many)
        generated = sum(len(r.token_ids) - 1 for r in results)  # fewer in a small context window
        rates.append(generated / (time.perf_counter() - start - first))
    return statistics.median(rates)


def measure(artifact: str, threads: int, runs: int = 5) -> dict[str, float]:
    """Tokens/s: prefill of 128- and 512-token prompts (those that fit the context), decode of 128 tokens after a
    16-token prompt and (where it fits) after a LONG_CONTEXT-token one; medians of `runs`."""
    engine = Engine(artifact, verify=False, max_batch_size=1, kv_cache_tokens=4096, threads=threads)
    results = {f"prefill {n}": prefill_rate(engine, n, runs) for n in PREFILL_LENGTHS if n < engine.context_window}
    results[f"decode {DECODE_TOKENS}"] = decode_rate(engine, [prompt_ids(engine.tokenizer.encode, 16)], runs)
    if LONG_CONTEXT + DECODE_TOKENS < engine.context_window:
        long_prompt = prompt_ids(engine.tokenizer.encode, LONG_CONTEXT)
        results[f"decode @{LONG_CONTEXT}"] = decode_rate(engine, [long_prompt], runs)
    return results


@dataclass
class SpeculativeResult:
    plain: float  # tokens/s of greedy decoding
    speculative: float  # tokens/s with the drafter
    acceptance: float  # the fraction of drafted tokens the target kept

    @property
    def speedup(self) -> float:
        return self.speculative / self.plain


def measure_speculative(
    artifact: str, threads: int, runs: int = 5, draft: str | Path | None = None, **speculation
) -> SpeculativeResult:
    """Greedy decoding of a summarise-this-text prompt (chat template if the model has one) without and with
    speculative decoding (`draft` or `prompt_lookup`, `draft_tokens`): tokens/s after the first token, medians of
    `runs`, and the acceptance rate. Both produce the same tokens."""
    engines = [
        Engine(artifact, verify=False, max_batch_size=1, kv_cache_tokens=2048, threads=threads, **options)
        for options in ({}, {"draft": draft, **speculation})
    ]
    message = [{"role": "user", "content": SUMMARY_REQUEST + PASSAGE}]
    tokenizer = engines[0].tokenizer
    ids = tokenizer.encode_chat(message) if tokenizer.chat_template else tokenizer.encode(SUMMARY_REQUEST + PASSAGE)
    ids = ids[: engines[0].context_window // 2]  # a small context keeps room to answer
    rates = []
    for engine in engines:
        times = []
        for _ in range(runs + 1):  # the first is a warm-up
            start = time.perf_counter()
            engine.generate_ids([ids], SamplingParams(max_tokens=1, temperature=0))
            first = time.perf_counter() - start
            start = time.perf_counter()
            generated = len(
                engine.generate_ids([ids], SamplingParams(max_tokens=DECODE_TOKENS, temperature=0))[0].token_ids
            )
            times.append((generated - 1) / (time.perf_counter() - start - first))
        rates.append(statistics.median(times[1:]))
    counters = engines[1].counters
    return SpeculativeResult(rates[0], rates[1], counters["accepted_tokens"] / max(1, counters["drafted_tokens"]))
