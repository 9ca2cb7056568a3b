"""Speculative decoding (runtime/speculative.py): greedy output equals plain decoding, sampled output follows the
target's distribution, whichever drafter proposes."""

from __future__ import annotations

import math
from collections import Counter

import httpx
import numpy as np
import openai
import pytest
from test_cli import assert_one_line_error, mlcc
from test_server import API_KEY, MODEL, running

from artifacts import MlccError
from runtime import Engine, SamplingParams, ServingEngine
from runtime.sampler import distribution
from runtime.speculative import Draft, PromptLookup, choose

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=True)
# Repeating prompts, so that n-gram lookup finds drafts from the first steps on.
PROMPTS = [[5, 9, 13, 7, 5, 9, 13, 7, 5, 9, 13, 2, 3], [11, 12, 13, 14, 15, 16, 11, 12, 13], [40, 41, 42]]
Z_1E4 = 3.719  # the standard normal's 1 - 1e-4 quantile


def chi2_bound(df: int) -> float:
    """The chi-square distribution's 1 - 1e-4 quantile (Wilson-Hilferty), so a correct rule fails 1 run in 10^4."""
    return df * (1 - 2 / (9 * df) + Z_1E4 * math.sqrt(2 / (9 * df))) ** 3


def assert_follows(samples: list[tuple[int, ...]], expected: dict[tuple[int, ...], float]) -> None:
    """Pearson's chi-square test of `samples` against the probabilities `expected` (cells of expected count < 5
    pooled); any sample outside `expected`'s support fails."""
    counts = Counter(samples)
    assert set(counts) <= set(expected), f"impossible outcomes: {set(counts) - set(expected)}"
    n = len(samples)
    cells, pooled = [], [0.0, 0]
    for outcome, p in expected.items():
        if n * p >= 5:
            cells.append((n * p, counts[outcome]))
        else:
            pooled = [pooled[0] + n * p, pooled[1] + counts[outcome]]
    if pooled[0] > 0:
        cells.append(tuple(pooled))
    stat = sum((seen - exp) ** 2 / exp for exp, seen in cells)
    assert len(cells) >= 3, "too few cells to test"
    assert stat < chi2_bound(len(cells) - 1), (stat, cells)


def first_two_tokens(engine: Engine, prompt: list[int], params: SamplingParams) -> dict[tuple[int, int], float]:
    """The target's exact probability of each (first, second) generated token pair under `params`."""
    first = distribution(engine.prompt_logits(prompt)[-1], params)
    pairs = {}
    for t1 in np.flatnonzero(first):
        second = distribution(engine.prompt_logits([*prompt, int(t1)])[-1], params)
        for t2 in np.flatnonzero(second):
            pairs[(int(t1), int(t2))] = float(first[t1] * second[t2])
    return pairs


class PointMassDrafter(PromptLookup):
    """Drafts, after first token t, the target's most likely second token: the rule then keeps it about as often
    as it rejects it (a random tiny model's own text rarely repeats, so n-gram lookup would never be kept)."""

    def __init__(self, pairs: dict[tuple[int, int], float]):
        super().__init__()
        self.best = {t1: max((p, t2) for (a, t2), p in pairs.items() if a == t1)[1] for t1, _ in pairs}

    def propose(self, requests: list, counts: list[int]) -> list[Draft]:
        return [Draft([self.best[r.output_ids[-1]]]) for r in requests]


def test_rejection_rule_keeps_the_target_distribution():
    """choose() alone, on synthetic distributions: with a point-mass draft and with a draft distribution unlike
    the target's, the token it returns is distributed as the target's p."""
    params = SamplingParams(temperature=1.0)
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))
    p = distribution(logits, params)
    q = np.array([0.05, 0.6, 0.05, 0.1, 0.2])
    rng = np.random.default_rng(0)
    for drafted_from in (None, q):
        samples = []
        for _ in range(20000):
            drafted = 1 if drafted_from is None else int(rng.choice(5, p=q))
            samples.append((choose(logits, params, rng, drafted, drafted_from)[0],))
        assert_follows(samples, {(i,): float(p[i]) for i in range(5)})
    # the rule must not just return the draft: a point mass on token 1 would fail the test above
    with pytest.raises(AssertionError):
        assert_follows([(1,)] * 1000, {(i,): float(p[i]) for i in range(5)})


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    lookup = PromptLookup(max_ngram=3)
    assert lookup.lookup([1, 2, 3, 9, 1, 2, 3, 8, 7, 1, 2, 3], 2) == [8, 7]  # latest 3-gram match wins
    assert lookup.lookup([4, 5, 6, 5], 3) == [6, 5]  # 1-gram when longer ones do not match; clipped at the end
    assert lookup.lookup([1, 2, 3], 4) == []


@pytest.mark.parametrize("drafter", ["prompt-lookup", "draft-model"])
def test_greedy_output_equals_plain_decoding(artifact, engine, drafter):
    """Tokens identical to plain decoding, and log-probabilities equal to float rounding (the verify call computes
    attention over a prompt-like split, not a decode step's, so not bit-identical); drafts were kept."""
    target = artifact("llama-f32")
    options = {"prompt_lookup": True} if drafter == "prompt-lookup" else {"draft": artifact("llama-q4")}
    spec = Engine(target, **options)
    expected = engine("llama-f32").generate_ids(PROMPTS, GREEDY)
    got = spec.generate_ids(PROMPTS, GREEDY)
    for a, b in zip(expected, got):
        assert b.token_ids == a.token_ids
        np.testing.assert_allclose([x.logprob for x in b.logprobs], [x.logprob for x in a.logprobs], atol=1e-4)
    assert 0 < spec.counters["accepted_tokens"] <= spec.counters["drafted_tokens"]
    # at temperature 0 a request's output does not depend on what else is in the batch
    alone = [spec.generate_ids([p], GREEDY)[0] for p in PROMPTS]
    for a, b in zip(alone, got):
        assert a.token_ids == b.token_ids
        assert [x.logprob for x in a.logprobs] == [x.logprob for x in b.logprobs]


def test_speculation_under_kv_pressure(artifact, engine):
    """A KV cache too small for every request: drafts take only free pages, requests are preempted and recomputed,
    and each still gets plain decoding's greedy tokens."""
    spec = Engine(artifact("llama-f32"), kv_cache_tokens=128, prompt_lookup=True, draft_tokens=6)
    prompts = [*PROMPTS, [7, 8, 9, 7, 8, 9, 7]]
    expected = engine("llama-f32").generate_ids(prompts, GREEDY)
    got = spec.generate_ids(prompts, GREEDY)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert spec.counters["preemptions"] > 0 and spec.counters["accepted_tokens"] > 0


def test_draft_identical_to_target_is_always_accepted(artifact):
    spec = Engine(artifact("llama-f32"), draft=artifact("llama-f32"), draft_tokens=5)
    spec.generate_ids(PROMPTS, GREEDY)
    assert spec.counters["drafted_tokens"] > 50
    assert spec.counters["accepted_tokens"] == spec.counters["drafted_tokens"]


@pytest.mark.parametrize("drafter", ["point-mass", "draft-model"])
def test_sampled_output_follows_the_target_distribution(artifact, engine, drafter):
    """Temperature 1, top-k 3: the first two tokens of 1500 seeded completions (the second decided by the
    rejection rule on a draft) against the target's exact pair probabilities: with point-mass drafts (as prompt
    lookup's) and with a draft model, a Mistral with other weights (a draft distribution unlike the target's)."""
    target = engine("llama-f32")
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=3, ignore_eos=True, seed=7, n=1500)
    prompt = [5, 9, 13, 7, 5, 9]
    expected = first_two_tokens(target, prompt, params)
    if drafter == "point-mass":
        spec = Engine(artifact("llama-f32"), prompt_lookup=True, draft_tokens=2)
        spec.drafter = PointMassDrafter(expected)
    else:
        spec = Engine(artifact("llama-f32"), draft=artifact("mistral-f32"), draft_tokens=2)
    results = spec.generate_ids([prompt], params)
    drafted, kept = spec.counters["drafted_tokens"], spec.counters["accepted_tokens"]
    assert 0 < kept < drafted, "both outcomes of the rule must occur"
    assert_follows([tuple(r.token_ids[:2]) for r in results], expected)


def test_bad_speculation_options(artifact, tmp_path):
    target = artifact("llama-f32")
    with pytest.raises(MlccError, match="choose one drafter"):
        Engine(target, draft=target, prompt_lookup=True)
    with pytest.raises(MlccError, match="draft tokens must be in 1.."):
        Engine(target, prompt_lookup=True, draft_tokens=0)
    with pytest.raises(MlccError):
        Engine(target, draft=tmp_path / "missing")


def test_cli_run_and_bench_speculate(artifact):
    art = str(artifact("llama-q4"))
    args = ["run", art, "--raw", "--prompt", "la la la la la la la", "--max-tokens", "24", "--temperature", "0"]
    plain, spec = mlcc(*args), mlcc(*args, "--prompt-lookup", "--draft-tokens", "3")
    assert spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert_one_line_error(mlcc(*args, "--draft", art + "-missing"), "missing")
    bench = mlcc("bench", art, "--draft", art, "--runs", "1", "--threads", "1")
    assert bench.returncode == 0, bench.stderr
    threads, plain_rate, spec_rate, speedup, accepted = bench.stdout.splitlines()[1].split()
    assert threads == "1" and float(plain_rate) > 0 and float(spec_rate) > 0 and accepted == "100%"


def test_server_streams_speculative_output(artifact, engine):
    """A server with a draft model streams the plain engine's greedy text and counts its drafts in /metrics."""
    art = artifact("llama-q4")
    with running(ServingEngine(art, draft=art, draft_tokens=3)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
        stream = client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0, stream=True
        )
        text = "".join(chunk.choices[0].text for chunk in stream)
        metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    expected = engine("llama-q4").generate("Once upon a time", SamplingParams(max_tokens=20, temperature=0))[0].text
    assert text == expected
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if not line.startswith("#")}
    assert values["mlcc_accepted_draft_tokens_total"] == values["mlcc_draft_tokens_total"] > 0
