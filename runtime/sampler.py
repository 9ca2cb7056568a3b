"""Token sampling on the host: penalties, logit bias, greedy, temperature, top-k, top-p, min-p, logprobs;
structured-output constraints (runtime/constraints.py) mask the logits first.

Every request owns a seeded numpy generator, so its samples do not depend on what else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from artifacts.errors import MlccError
from runtime.constraints import Constraint, constraint_of

MAX_TOP_LOGPROBS = 20
# Below this temperature sampling is greedy: dividing logits by a denormal overflows float64.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # beyond it the penalized logits overflow or vanish
SEED_RANGE = (-(2**63), 2**64)  # signed or unsigned 64-bit; the generator takes the value modulo 2**64
LOGPROB_FLOOR = -9999.0  # what OpenAI reports for impossible tokens: JSON has no -inf or NaN


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one; 0 means off
    repetition_penalty: float = 1.0  # transformers' semantics, over prompt and generated tokens; 1 means off
    presence_penalty: float = 0.0  # OpenAI's semantics, over generated tokens
    frequency_penalty: float = 0.0  # OpenAI's semantics, over generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    n: int = 1  # completions of the same prompt
    logprobs: bool = False  # report the log-probability of each generated token
    top_logprobs: int = 0  # and of this many most likely alternatives
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Structured output, at most one: the output is JSON valid against this schema (a dict or its JSON text;
    # {"type": "object"} for any JSON object), fully matches this regex, or follows this grammar (Lark/EBNF as
    # llguidance reads it, or llama.cpp's GBNF). The request ends when the constraint is complete.
    json_schema: dict[str, Any] | str | None = None
    regex: str | None = None
    grammar: str | None = None

    def validate(self, vocab_size: int | None = None) -> None:
        floats = [
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("repetition_penalty", self.repetition_penalty),
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
            *(("logit_bias", b) for b in self.logit_bias.values()),
        ]
        for name, value in floats:
            if not math.isfinite(value):
                raise MlccError(f"{name} must be a finite number")
        low, high = REPETITION_PENALTY_RANGE
        checks = [
            (self.max_tokens > 0, "max_tokens must be positive"),
            (0 <= self.temperature <= MAX_TEMPERATURE, f"temperature must be in [0, {MAX_TEMPERATURE:g}]"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (low <= self.repetition_penalty <= high, f"repetition_penalty must be in [{low:g}, {high:g}]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.n >= 1, "n must be >= 1"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]"),
            (all(-100 <= b <= 100 for b in self.logit_bias.values()), "logit_bias values must be in [-100, 100]"),
            (self.seed is None or SEED_RANGE[0] <= self.seed < SEED_RANGE[1], "seed must be a 64-bit integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise MlccError(message)
        constraint_of(self.json_schema, self.regex, self.grammar)  # at most one; its content is checked when compiled
        if vocab_size is not None:
            for token in [*self.logit_bias, *self.stop_token_ids]:
                if not 0 <= token < vocab_size:
                    raise MlccError(f"token id {token} is outside the vocabulary (0..{vocab_size - 1})")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def constraint(self) -> Constraint | None:
        return constraint_of(self.json_schema, self.regex, self.grammar)

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.repetition_penalty != 1 or self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


def adjust_logits(
    logits: np.ndarray, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> np.ndarray:
    """Penalties then logit bias, in float32; the input row is left untouched."""
    if not params.adjusts_logits:
        return logits
    x = logits.astype(np.float32, copy=True)
    if params.repetition_penalty != 1:
        seen = np.unique(np.asarray(prompt_ids + output_ids, dtype=np.int64))
        values = x[seen]
        x[seen] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        counts = np.bincount(np.asarray(output_ids, dtype=np.int64), minlength=x.size)[: x.size]
        x -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    for token, bias in params.logit_bias.items():
        x[token] += bias
    return x


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """What OpenAI reports: log-softmax of the adjusted logits, before temperature."""
    lp = log_softmax(logits)
    best = np.argsort(-lp, kind="stable")[:top] if top else []
    return TokenLogprob(token, _finite(float(lp[token])), [(int(i), _finite(float(lp[i]))) for i in best])


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from a float32 [vocab] row of (adjusted) logits."""
    if params.greedy:
        _check_finite(logits)
        return int(np.argmax(logits))
    candidates, weights = _candidates(logits, params)
    return int(candidates[rng.choice(weights.size, p=weights / weights.sum())])


def distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The probabilities [vocab] (float64) `sample` draws from: one-hot when greedy. Speculative decoding's
    acceptance rule compares the target's and the draft's."""
    probs = np.zeros(logits.size)
    if params.greedy:
        _check_finite(logits)
        probs[int(np.argmax(logits))] = 1.0
        return probs
    candidates, weights = _candidates(logits, params)
    probs[candidates] = weights / weights.sum()
    return probs


def _check_finite(logits: np.ndarray) -> None:
    if not np.isfinite(logits.max()):  # NaN, +inf, or every token banned
        raise MlccError("the model produced non-finite logits")


def _candidates(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The token ids sampling may pick and their unnormalized weights, after temperature, top-k, top-p, min-p."""
    _check_finite(logits)
    x = (logits.astype(np.float64) - float(logits.max())) / params.temperature  # <= 0: exp cannot overflow
    if 0 < params.top_k < x.size:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    candidates = nucleus(probs, params.top_p) if params.top_p < 1 else np.flatnonzero(probs)
    kept = probs[candidates]
    if params.min_p > 0:
        kept = np.where(kept >= params.min_p * probs.max(), kept, 0.0)
    return candidates, kept


def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Token ids of the smallest most-probable set whose mass reaches top_p, most probable first.

    Sorting a 262k vocabulary on every token costs more than the model's decode step, so this sorts only a
    growing head of the distribution, found with a partial partition, until it holds enough mass."""
    head = 64
    while True:
        head = min(head, probs.size)
        ids = np.argpartition(-probs, head - 1)[:head]
        ids = ids[np.argsort(-probs[ids], kind="stable")]
        cumulative = np.cumsum(probs[ids])
        if cumulative[-1] >= top_p or head == probs.size:
            return ids[: int(np.searchsorted(cumulative, top_p)) + 1]
        head *= 4
