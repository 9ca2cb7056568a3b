"""Engine features for serving: penalties, logit bias, min-p, logprobs, n, abort, prefix caching, a small KV cache,
prefill interleaved with decode, preemption."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from artifacts import MlccError
from runtime import Delta, Engine, SamplingParams, ServingEngine
from runtime.sampler import adjust_logits, log_softmax, sample

LONG_PREFIX = (
    "Once upon a time there was a little robot who loved to compile programs. "
    "The quick brown fox jumps over the lazy dog."
)


def reference_adjust(logits: np.ndarray, p: SamplingParams, prompt: list[int], output: list[int]) -> np.ndarray:
    """transformers' repetition penalty, then OpenAI's presence/frequency penalties and logit bias."""
    ids = torch.tensor([prompt + output])
    x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, torch.tensor(logits[None]))[0].numpy().copy()
    for token in set(output):
        x[token] -= p.presence_penalty + p.frequency_penalty * output.count(token)
    for token, bias in p.logit_bias.items():
        x[token] += bias
    return x


@pytest.fixture(scope="module")
def no_cache_engine(artifact):
    return Engine(artifact("llama-q4"), prefix_cache=False)


def test_penalties_and_bias_match_the_reference():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(300).astype(np.float32) * 3
    prompt, output = [5, 7, 7, 9], [7, 11, 11, 11, 250]
    params = SamplingParams(
        repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: 5.0, 11: -100.0}
    )
    got = adjust_logits(logits, params, prompt, output)
    np.testing.assert_allclose(got, reference_adjust(logits, params, prompt, output), rtol=1e-6, atol=1e-6)
    assert adjust_logits(logits, SamplingParams(), prompt, output) is logits  # nothing to do, no copy


def test_min_p_keeps_only_likely_tokens():
    logits = np.log(np.array([0.5, 0.3, 0.1, 0.06, 0.04], dtype=np.float32))
    rng = np.random.default_rng(0)
    picks = {sample(logits, SamplingParams(temperature=1.0, min_p=0.5), rng) for _ in range(300)}
    assert picks == {0, 1}  # 0.1 < 0.5 * 0.5
    with pytest.raises(MlccError, match="min_p"):
        SamplingParams(min_p=1.5).validate()
    with pytest.raises(MlccError, match="outside the vocabulary"):
        SamplingParams(logit_bias={10_000: 1.0}).validate(vocab_size=384)


def test_greedy_with_penalties_matches_a_step_by_step_reference(engine):
    eng = engine("llama-q4")
    prompt = eng.tokenizer.encode("Hello there, robot")
    params = SamplingParams(
        max_tokens=8,
        temperature=0,
        ignore_eos=True,
        repetition_penalty=1.5,
        frequency_penalty=0.7,
        logit_bias={42: 2.0},
    )
    output: list[int] = []
    for _ in range(params.max_tokens):
        logits = eng.prefill_logits([prompt + output])[0]
        output.append(int(np.argmax(reference_adjust(logits, params, prompt, output))))
    assert eng.generate_ids([prompt], params)[0].token_ids == output


def test_logit_bias_forces_a_token(engine):
    result = engine("llama-q4").generate("Hi", SamplingParams(max_tokens=5, temperature=0.8, logit_bias={57: 100}))[0]
    assert result.token_ids == [57] * 5


def test_logprobs_are_log_softmax_before_temperature(engine):
    eng = engine("llama-q4")
    prompt = eng.tokenizer.encode("The quick brown")
    params = SamplingParams(max_tokens=4, temperature=0.7, seed=3, logprobs=True, top_logprobs=3, presence_penalty=1)
    result = eng.generate_ids([prompt], params)[0]
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids)
    expected = log_softmax(eng.prefill_logits([prompt])[0])
    first = result.logprobs[0]
    assert first.token_id == result.token_ids[0]
    assert first.logprob == pytest.approx(expected[first.token_id], abs=1e-4)
    assert [t for t, _ in first.top] == np.argsort(-expected)[:3].tolist()
    second = result.logprobs[1]  # presence penalty applies to the first generated token
    adjusted = adjust_logits(
        eng.prefill_logits([prompt + result.token_ids[:1]])[0], params, prompt, result.token_ids[:1]
    )
    assert second.logprob == pytest.approx(log_softmax(adjusted)[second.token_id], abs=1e-4)


def test_n_completions_and_seeds(engine):
    eng = engine("llama-q4")
    params = dict(max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    many = eng.generate(LONG_PREFIX, SamplingParams(n=3, **params))
    assert len(many) == 3
    assert many[0].token_ids == eng.generate(LONG_PREFIX, SamplingParams(**params))[0].token_ids
    assert len({tuple(r.token_ids) for r in many}) == 3
    assert all(r.cached_tokens > 0 for r in many[1:])  # siblings fork the first one's prompt


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(engine):
    eng = engine("llama-q4")
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, min_p=0.05, seed=5, repetition_penalty=1.2)
    alone = eng.generate("Hello", params)[0]
    others = [f"Busy {i} " * (i + 1) for i in range(6)]
    busy = eng.generate([*others[:3], "Hello", *others[3:]], params)
    assert busy[3].token_ids == alone.token_ids


def test_abort_frees_the_sequence_at_once(artifact):
    eng = Engine(artifact("llama-q4"), prefix_cache=False)
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    seen: list = []
    running = eng.make_requests(eng.tokenizer.encode(LONG_PREFIX), params, seen.append)
    queued = eng.make_requests(eng.tokenizer.encode("Hi"), params)
    eng.enqueue(running)
    eng.step()
    eng.step()
    eng.enqueue(queued)
    used = eng.kv_tokens_used
    eng.abort(running[0])
    eng.abort(queued[0])
    assert eng.kv_tokens_used < used and not eng.has_work
    assert running[0].finish_reason == queued[0].finish_reason == "abort"
    assert seen[-1].finish_reason == "abort"
    eng.abort(running[0])  # a second abort is harmless


def test_prefix_cache_gives_the_same_text_and_counts_cached_tokens(artifact, no_cache_engine):
    eng = Engine(artifact("llama-q4"))
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    first = eng.generate(LONG_PREFIX + " One", params)[0]
    assert first.cached_tokens == 0
    second = eng.generate(LONG_PREFIX + " Two more words", params)[0]
    prefix_len = len(eng.tokenizer.encode(LONG_PREFIX))
    assert eng.page_size <= second.cached_tokens <= prefix_len + 1
    assert second.token_ids == no_cache_engine.generate(LONG_PREFIX + " Two more words", params)[0].token_ids
    again = eng.generate(LONG_PREFIX + " One", params)[0]  # the whole prompt is cached: the last token is prefilled
    assert again.cached_tokens == (first.prompt_tokens - 1) // eng.canonical_chunk * eng.canonical_chunk
    assert again.token_ids == first.token_ids
    # a prompt that continues a finished request's generated text forks only the whole chunks of its prompt:
    # generated tokens' KV came from decode steps, which round differently from a prefill of the same tokens
    follow = eng.generate_ids([eng.tokenizer.encode(LONG_PREFIX + " One") + first.token_ids], params)[0]
    assert follow.cached_tokens == again.cached_tokens
    assert (
        follow.token_ids
        == no_cache_engine.generate_ids([eng.tokenizer.encode(LONG_PREFIX + " One") + first.token_ids], params)[
            0
        ].token_ids
    )


def test_sliding_window_models_do_not_fork(engine):
    eng = engine("mistral-f32")  # TVM's cascade attention over a forked prefix ignores the window
    params = SamplingParams(max_tokens=4, temperature=0)
    assert not eng.prefix_cache
    assert [eng.generate(LONG_PREFIX, params)[0].cached_tokens for _ in range(2)] == [0, 0]


def test_small_kv_cache_queues_and_evicts_without_changing_results(artifact, no_cache_engine):
    eng = Engine(artifact("llama-q4"), kv_cache_tokens=96)  # 7 pages: two of these requests at once
    prompts = [f"{LONG_PREFIX[: 20 + 9 * i]} {i}" for i in range(8)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    requests = [r for p in prompts for r in eng.make_requests(eng.tokenizer.encode(p), params)]
    eng.enqueue(requests)
    peak = 0
    while eng.has_work:
        eng.step()
        peak = max(peak, len(eng.running))
        assert eng.kv_tokens_used <= eng.kv.total_pages * eng.page_size
    assert 1 < peak < len(prompts)
    assert [r.output_ids for r in requests] == [no_cache_engine.generate(p, params)[0].token_ids for p in prompts]
    assert len(eng.cached) > 0
    with pytest.raises(MlccError, match="does not fit the KV cache"):
        eng.generate(LONG_PREFIX, SamplingParams(max_tokens=120, ignore_eos=True))


def test_a_long_prompt_is_prefilled_a_chunk_per_step_while_others_decode(artifact, no_cache_engine):
    eng = Engine(artifact("llama-q4"), prefill_chunk=8)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    [short] = eng.make_requests(eng.tokenizer.encode("Hello"), params)
    [long] = eng.make_requests(eng.tokenizer.encode(LONG_PREFIX), params)
    eng.enqueue([short])
    eng.step()
    eng.enqueue([long])
    prefill_steps = 0
    while not long.output_ids:
        before = len(short.output_ids)
        eng.step()
        prefill_steps += 1
        assert len(short.output_ids) == before + 1  # the decoding request never skips a step
    assert prefill_steps == -(-len(long.prompt_ids) // eng.canonical_chunk)  # one canonical chunk a step
    while eng.has_work:
        eng.step()
    assert short.text == no_cache_engine.generate("Hello", params)[0].text
    assert long.text == no_cache_engine.generate(LONG_PREFIX, params)[0].text

    # siblings wait until the first one's prompt is prefilled, then fork its whole canonical chunks
    sampled = SamplingParams(max_tokens=8, temperature=1.0, seed=4, ignore_eos=True)
    many = eng.generate("Twice: " + LONG_PREFIX, SamplingParams(**{**vars(sampled), "n": 3}))
    reusable = (many[0].prompt_tokens - 1) // eng.canonical_chunk * eng.canonical_chunk
    assert [r.cached_tokens for r in many] == [0] + [reusable] * 2
    assert many[0].token_ids == no_cache_engine.generate("Twice: " + LONG_PREFIX, sampled)[0].token_ids

    # an abort in the middle of a prefill frees the sequence
    [partial] = eng.make_requests(eng.tokenizer.encode("Hi! " + LONG_PREFIX), params)
    eng.enqueue([partial])
    eng.step()
    assert 0 < partial.kv_len < partial.prefill_len
    used = eng.kv_tokens_used
    eng.abort(partial)
    assert eng.kv_tokens_used < used and not eng.has_work and partial.finish_reason == "abort"
    with pytest.raises(MlccError, match="prefill_chunk"):
        Engine(artifact("llama-q4"), prefill_chunk=eng.kernel_prefill_chunk + 1)


def test_only_the_call_that_ends_a_prompt_computes_its_logits(artifact):
    eng = Engine(artifact("llama-q4"))
    forward, asked = eng._forward, []

    def spy(fn, seq_ids, lengths, ids, *extra):
        if fn is eng._prefill:
            asked.append((list(lengths), len(extra[0])))  # tokens per sequence, logit rows
        return forward(fn, seq_ids, lengths, ids, *extra)

    long, short = eng.tokenizer.encode(LONG_PREFIX * 2), eng.tokenizer.encode("Hello there")
    assert len(long) > 2 * eng.canonical_chunk
    alone = [eng.prefill_logits([ids])[0] for ids in (long, short)]
    eng._forward = spy
    together = eng.prefill_logits([long, short])
    # the short prompt ends in the first call, the long one in its last
    chunks = -(-len(long) // eng.canonical_chunk)
    assert asked == [([eng.canonical_chunk, len(short)], 1)] + [([eng.canonical_chunk], 0)] * (chunks - 2) + [
        ([len(long) - (chunks - 1) * eng.canonical_chunk], 1)
    ]
    np.testing.assert_array_equal(together, np.stack(alone))


def test_running_out_of_kv_pages_preempts_and_recomputes_without_changing_results(artifact, no_cache_engine):
    eng = Engine(artifact("llama-q4"), kv_cache_tokens=96)  # 7 pages; each request grows to 4 of them
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, repetition_penalty=1.3)
    sampled = SamplingParams(max_tokens=40, temperature=0.8, seed=7, ignore_eos=True, frequency_penalty=0.5)
    jobs = [(f"{LONG_PREFIX[: 10 + 7 * i]} {i}", greedy if i % 2 else sampled) for i in range(6)]
    deltas: list[list[Delta]] = [[] for _ in jobs]
    requests = [
        eng.make_requests(eng.tokenizer.encode(prompt), params, deltas[i].append)[0]
        for i, (prompt, params) in enumerate(jobs)
    ]
    eng.enqueue(requests)
    while eng.has_work:
        eng.step()
        assert eng.kv_tokens_used <= eng.kv.total_pages * eng.page_size
    assert eng.counters["preemptions"] > 0 and any(r.preemptions for r in requests)
    for r, got, (prompt, params) in zip(requests, deltas, jobs):
        alone = no_cache_engine.generate(prompt, params)[0]
        assert (r.text, r.output_ids, r.finish_reason) == (alone.text, alone.token_ids, "length")
        # what was streamed before a preemption is neither repeated nor changed
        assert "".join(d.text for d in got) == r.text
        assert [t for d in got for t in d.token_ids] == r.output_ids
        assert [d.finish_reason for d in got] == [None] * (len(got) - 1) + ["length"]


def test_serving_engine_from_threads_and_asyncio(artifact, no_cache_engine):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = no_cache_engine.generate("Hello", params)[0].text
    with ServingEngine(artifact("llama-q4"), max_batch_size=4) as serving:
        assert serving.generate_sync("Hello", params)[0].text == expected
        assert "".join(serving.stream_sync("Hello", params)) == expected

        async def main() -> list[str]:
            pieces = [p async for p in serving.stream("Hello", params)]
            results = await asyncio.gather(*(serving.generate("Hello", params) for _ in range(6)))
            return ["".join(pieces), *(r[0].text for r in results)]

        assert asyncio.run(main()) == [expected] * 7
        deadline = time.monotonic() + 5  # the snapshot is refreshed right after the step that delivered the results
        while serving.stats["requests_running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert serving.stats["requests_running"] == 0
