"""At temperature 0 a request's tokens and logits are bit-identical whatever is cached, however its prompt is
chunked and whatever else is in the batch (runtime/engine.py, "Determinism")."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from runtime import Engine, SamplingParams
from runtime.engine import CANONICAL_CHUNK

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
TEXT = (
    "Once upon a time there was a little robot who loved to compile programs. The quick brown fox jumps over "
    "the lazy dog. Ahead-of-time compilers turn models into libraries; runtimes load them on small devices. "
)


def recorded(engine: Engine) -> dict[int, list[bytes]]:
    """Record the logits every request samples from, by request arrival number."""
    rows: dict[int, list[bytes]] = {}
    accept = engine._accept_or_fail

    def spy(r, logits):
        rows.setdefault(r.arrival, []).append(np.ascontiguousarray(logits, dtype=np.float32).tobytes())
        accept(r, logits)

    engine._accept_or_fail = spy
    return rows


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[tuple[list[int], str]]:
    """(tokens, sha256 of the logits sampled from) per request, all run together."""
    rows = recorded(engine)
    requests = [r for ids in prompts for r in engine.make_requests(list(ids), params)]
    engine.enqueue(requests)
    while any(r.finish_reason is None for r in requests):
        engine.step()
    digests = [hashlib.sha256(b"".join(rows[r.arrival])).hexdigest() for r in requests]
    return [(r.output_ids, d) for r, d in zip(requests, digests)]


def check_deterministic(artifact: Path, prompt_text: str, other_texts: list[str]) -> dict[str, int]:
    """The same greedy request fresh, with its prefix cached (twice), with prompts chunked at 3 step budgets,
    and in a busy batch with other prompts (one sharing its prefix): identical tokens and logits."""
    fresh = Engine(artifact, max_batch_size=8)
    prompt = fresh.tokenizer.encode(prompt_text)
    assert len(prompt) > 2 * fresh.canonical_chunk, "the prompt must span several canonical chunks"
    (expected,) = run(fresh, [prompt])

    cached = run(fresh, [prompt])[0]
    hits = fresh.counters["cached_tokens"]
    assert hits >= fresh.canonical_chunk, "the second run must reuse the cached prefix"
    assert cached == expected

    for budget in (1, fresh.canonical_chunk + 7, fresh.kernel_prefill_chunk):
        assert run(Engine(artifact, prefill_chunk=budget), [prompt])[0] == expected, budget

    busy = Engine(artifact, max_batch_size=8)
    others = [busy.tokenizer.encode(t) for t in other_texts]
    sibling = prompt[: busy.canonical_chunk + 5] + others[0][:20]  # shares the first canonical chunk
    batch = [others[0], sibling, prompt, *others[1:]]
    # Every request of the busy batch equals its solo run: short ones decode beside long ones whose KV has
    # two block-tree depths (an empty depth must add nothing to their attention).
    assert run(busy, batch) == [run(Engine(artifact), [ids])[0] for ids in batch[:2]] + [expected] + [
        run(Engine(artifact), [ids])[0] for ids in others[1:]
    ]
    # ... and forked from a running request that shares its prompt, inside that same busy batch.
    results = run(busy, [prompt, others[1], prompt])
    assert results[0] == expected and results[2] == expected
    return {"prompt_tokens": len(prompt), "cached_tokens": hits}


@pytest.fixture(scope="module")
def long_context_artifact(tmp_path_factory) -> Path:
    """A tiny Llama whose context holds several canonical chunks."""
    from tiny_models import make_model

    from compiler.compile import compile_model

    folder = tmp_path_factory.mktemp("determinism")
    hf = make_model("llama", folder / "hf", max_position_embeddings=4 * CANONICAL_CHUNK)
    compile_model(str(hf), folder / "art", quant="q0f32", progress=lambda _: None)
    return folder / "art"


def test_greedy_output_does_not_depend_on_cache_chunking_or_batch(long_context_artifact):
    check_deterministic(long_context_artifact, TEXT * 4, [TEXT[::-1] * 2, "Hello! " * 30, TEXT[40:] * 3])


def test_prompt_logits_equal_a_requests_first_logits(long_context_artifact):
    engine = Engine(long_context_artifact)
    prompt = engine.tokenizer.encode(TEXT * 3)
    rows = recorded(engine)
    engine.generate_ids([prompt], SamplingParams(max_tokens=1, temperature=0))
    first = np.frombuffer(rows[0][0], dtype=np.float32)
    assert np.array_equal(engine.prompt_logits(prompt)[-1], first)
    assert np.array_equal(engine.prefill_logits([prompt])[0], first)


def test_a_preempted_request_continues_bit_identically(long_context_artifact):
    """KV pages run out: the newest requests are preempted, recomputed (prompt by prefill, generated tokens
    replayed by decode steps) and continue with the logits they would have had undisturbed."""
    probe = Engine(long_context_artifact)
    # Generation crosses a canonical chunk boundary, where a prefill of the same tokens would split attention.
    prompts = [probe.tokenizer.encode(TEXT[: 40 + 30 * i] + TEXT + str(i)) for i in range(5)]
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    alone = [run(Engine(long_context_artifact), [ids], params)[0] for ids in prompts]
    tight = Engine(long_context_artifact, kv_cache_tokens=8 * probe.page_size * 4, max_batch_size=5)
    assert run(tight, prompts, params) == alone
    assert tight.counters["preemptions"] > 0
