"""Token sampling on the host: greedy, temperature, top-k, top-p, per-request seeded generators."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from artifacts.errors import MlccError


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_tokens <= 0:
            raise MlccError("max_tokens must be positive")
        if self.temperature < 0:
            raise MlccError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise MlccError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise MlccError("top_k must be >= 0")


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from a float32 [vocab] row of logits."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < x.size:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if params.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.size, p=probs))
