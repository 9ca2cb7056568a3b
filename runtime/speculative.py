"""Speculative decoding: a cheap drafter proposes the next few tokens of a request, the target model scores all of
them in one call (one row of logits per drafted token, plus one), and the standard rejection rule keeps a prefix
of the drafts and samples one more token from the target, so each request's output distribution is the target's.

Drafters:
- PromptLookup: the tokens that followed the latest earlier occurrence of the request's last n tokens (n-gram
  prompt lookup: no second model; strong where the output repeats its input, as in summaries, edits and code).
- DraftModel: a smaller or more quantized artifact with the same tokenizer, with its own paged KV cache, sampled
  with the request's own sampling parameters.

The rule (Leviathan et al., Chen et al.): a drafted token d drawn from the draft's distribution q is kept with
probability min(1, p(d) / q(d)), p being the target's; on the first rejection the token comes from the residual
max(0, p - q), renormalized; when every draft is kept, one more token comes from p. A prompt-lookup draft is a
point mass (q(d) = 1). At temperature 0 both p and q are one-hot: a draft is kept exactly when it is the target's
argmax, and the output's tokens are the greedy ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from artifacts import MlccError
from runtime.artifact import LoadedArtifact
from runtime.kv_cache import PagedKV
from runtime.sampler import SamplingParams, adjust_logits, distribution, sample

MAX_DRAFT_TOKENS = 16


class Request(Protocol):
    """What a drafter reads of the engine's request (runtime/engine.py imports this module, not the reverse)."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    rng: np.random.Generator

    def all_ids(self) -> list[int]: ...


@dataclass
class Draft:
    tokens: list[int]
    probs: list[np.ndarray] | None = None  # the draft's distribution at each token, None for a point mass


def choose(
    adjusted: np.ndarray, params: SamplingParams, rng: np.random.Generator, drafted: int, q: np.ndarray | None
) -> tuple[int, bool]:
    """(token, kept): the drafted token if the rejection rule keeps it, else a token from the residual; `adjusted`
    is the target's row of logits after penalties, `q` the draft's distribution (None: a point mass on `drafted`)."""
    if params.greedy:
        token = sample(adjusted, params, rng)
        return token, token == drafted
    p = distribution(adjusted, params)
    q_drafted = 1.0 if q is None else float(q[drafted])
    if rng.random() * q_drafted < p[drafted]:
        return drafted, True
    if q is None:
        residual = p.copy()
        residual[drafted] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    if total <= 0:  # p == q up to rounding: nothing is left to correct
        residual, total = p, 1.0
    return int(rng.choice(residual.size, p=residual / total)), False


class PromptLookup:
    """Drafts by n-gram lookup in the request's own tokens (prompt and output), longest n first."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, requests: list[Request], counts: list[int]) -> list[Draft]:
        return [Draft(self.lookup(r.all_ids(), k)) for r, k in zip(requests, counts)]

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the last n tokens."""
        ids = np.asarray(tokens)
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            # windows of n tokens that end before the last token, so that at least one token follows each
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
            hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return [int(t) for t in ids[start : start + k]]
        return []

    def rollback(self, request: Request, kept: int) -> None:
        """Nothing to undo: prompt lookup keeps no state."""

    def forget(self, request: Request) -> None:
        """Nothing to free: prompt lookup keeps no state."""


class DraftModel:
    """A draft artifact run beside the target: a KV sequence per request, kept in step with the request's tokens."""

    def __init__(self, path: str | Path, target: LoadedArtifact, max_sequences: int, tokens: int, verify: bool):
        self.artifact = LoadedArtifact(path, verify=verify)
        m = self.artifact.manifest
        if m.lora_slots or m.kv_cache.get("rope_switch_length"):
            raise MlccError(f"{path}: a draft model must be a plain build (no adapter slots, no LongRoPE)")
        same_vocab = m.model_config.get("vocab_size") == target.manifest.model_config.get("vocab_size")
        if not same_vocab or self.artifact.tokenizer.tok.get_vocab() != target.tokenizer.tok.get_vocab():
            raise MlccError(f"{path}: the draft model's tokenizer or vocabulary differs from the target's")
        self.chunk = m.kv_cache["prefill_chunk_size"]
        self.context_window = m.context_window
        self.kv = PagedKV(
            self.artifact.vm["create_paged_kv_cache"], max_sequences, tokens, self.chunk, m.kv_cache["page_size"]
        )
        self._prefill, self._decode = self.artifact.vm["batch_prefill"], self.artifact.vm["batch_decode"]
        self.sequences: dict[int, list[int]] = {}  # id(request) -> [KV sequence id, tokens in its KV]

    def propose(self, requests: list[Request], counts: list[int]) -> list[Draft]:
        """Draft `counts[i]` tokens for each request: catch its KV up with the request's tokens, then sample one
        token at a time; a request whose tokens do not fit the draft's KV or context gets no draft."""
        drafts = [Draft([], []) for _ in requests]
        free = self.kv.free_pages()
        live = []
        for i, (r, k) in enumerate(zip(requests, counts)):
            pages = self._pages_to_draft(r, k)
            if pages is not None and pages <= free:
                free -= pages
                live.append(i)
                if id(r) not in self.sequences:
                    self.sequences[id(r)] = [self.kv.add(), 0]
        if not live:
            return drafts
        rows = dict(zip(live, self._catch_up([requests[i] for i in live])))
        states = {i: self.sequences[id(requests[i])] for i in live}
        for step in range(max(counts[i] for i in live)):
            active = [i for i in live if step < counts[i]]
            if step:  # feed each request's previous draft
                last = np.array([drafts[i].tokens[-1] for i in active], dtype="int32")
                out = self._call(self._decode, [states[i][0] for i in active], [1] * len(active), last)
                rows = dict(zip(active, out))
                for i in active:
                    states[i][1] += 1
            for i in active:
                r = requests[i]
                adjusted = adjust_logits(rows[i], r.params, r.prompt_ids, r.output_ids + drafts[i].tokens)
                q = distribution(adjusted, r.params)
                token = int(np.argmax(q)) if r.params.greedy else int(r.rng.choice(q.size, p=q))
                drafts[i].tokens.append(token)
                drafts[i].probs.append(q)
        return drafts

    def rollback(self, request: Request, kept: int) -> None:
        """After verification, before the request takes its new tokens: keep the KV of the `kept` drafted tokens
        the target accepted (the draft's KV holds all drafts but the last)."""
        state = self.sequences.get(id(request))
        if state is None:
            return
        in_kv = state[1] - request.num_ids()  # drafted tokens in the draft's KV
        drop = max(0, in_kv - kept)
        self.kv.pop(state[0], drop)
        state[1] -= drop

    def forget(self, request: Request) -> None:
        state = self.sequences.pop(id(request), None)
        if state is not None:
            self.kv.remove(state[0])

    def _pages_to_draft(self, r: Request, k: int) -> int | None:
        """The draft KV pages `r` needs beyond its own to hold its tokens and `k` drafts; None beyond the draft's
        context window."""
        needed = r.num_ids() + k
        if needed > self.context_window:
            return None
        state = self.sequences.get(id(r))
        return self.kv.pages_needed(needed, 0) - (0 if state is None else self.kv.pages_needed(state[1], 0))

    def _catch_up(self, requests: list[Request]) -> list[np.ndarray]:
        """Prefill the tokens each request's draft KV lacks, in calls of at most one chunk; the logits after each
        request's last token."""
        rows: dict[int, np.ndarray] = {}
        pending = {i: r.all_ids()[self.sequences[id(r)][1] :] for i, r in enumerate(requests)}
        while pending:
            batch, budget = [], self.chunk
            for i, tokens in pending.items():
                if budget == 0:
                    break
                batch.append((i, min(len(tokens), budget)))
                budget -= batch[-1][1]
            ids = np.concatenate([pending[i][:take] for i, take in batch]).astype("int32")
            lengths = [take for _, take in batch]
            positions = (np.cumsum(lengths) - 1).astype("int32")
            seq_ids = [self.sequences[id(requests[i])][0] for i, _ in batch]
            out = self._call(self._prefill, seq_ids, lengths, ids, positions)
            for row, (i, take) in zip(out, batch):
                self.sequences[id(requests[i])][1] += take
                pending[i] = pending[i][take:]
                if not pending[i]:
                    rows[i] = row
                    del pending[i]
        return [rows[i] for i in range(len(requests))]

    def _call(self, fn: Any, seq_ids: list[int], lengths: list[int], ids: np.ndarray, *extra: np.ndarray) -> Any:
        inputs = [ids, *extra]
        return self.kv.forward(fn, seq_ids, lengths, inputs, self.artifact.params, self.artifact.device).numpy()
