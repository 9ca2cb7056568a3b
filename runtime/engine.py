"""The engine: a paged KV cache, batched prefill and decode, sampling, stop conditions, streaming.

Requests wait in a queue; each step admits waiting requests while batch slots and KV pages allow,
prefills them (several prompts concatenated into one ragged batch, in chunks), then decodes one token for
every running request in a single batched call.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm.runtime import ShapeTuple

from artifacts import MlccError
from runtime.artifact import LoadedArtifact
from runtime.sampler import SamplingParams, sample
from runtime.tokenizer import IncrementalDecoder

_f = tvm.get_global_func
KV_ADD = _f("vm.builtin.kv_state_add_sequence")
KV_REMOVE = _f("vm.builtin.kv_state_remove_sequence")
KV_BEGIN = _f("vm.builtin.kv_state_begin_forward")
KV_END = _f("vm.builtin.kv_state_end_forward")


def set_threads(n: int) -> None:
    """Size TVM's CPU thread pool (it otherwise guesses, and on small VMs guesses one)."""
    os.environ["TVM_NUM_THREADS"] = str(n)
    tvm.get_global_func("runtime.config_threadpool")(-3, n)  # -3: n threads sharing all cores


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None
    seq_id: int = -1
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    decoder: IncrementalDecoder | None = None

    @property
    def budget(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens


class Engine:
    """Runs an artifact. `generate`, `stream` and `chat` are the Python API the CLI uses."""

    def __init__(
        self,
        artifact: str | Path,
        max_batch_size: int | None = None,
        kv_cache_tokens: int | None = None,
        verify: bool = True,
        threads: int | None = None,
    ):
        set_threads(threads or os.cpu_count() or 1)
        self.artifact = LoadedArtifact(artifact, verify=verify)
        m = self.artifact.manifest
        self.tokenizer = self.artifact.tokenizer
        self.context_window = m.context_window
        self.max_batch_size = max_batch_size or m.kv_cache["max_batch_size"]
        self.prefill_chunk = m.kv_cache["prefill_chunk_size"]
        self.page_size = m.kv_cache["page_size"]
        self.kv_tokens = kv_cache_tokens or self.context_window * self.max_batch_size
        self.kv = self.artifact.vm["create_paged_kv_cache"](
            ShapeTuple([self.max_batch_size]),
            ShapeTuple([self.kv_tokens]),
            ShapeTuple([self.prefill_chunk]),
            ShapeTuple([self.page_size]),
            ShapeTuple([0]),
        )
        self._prefill = self.artifact.vm["batch_prefill"]
        self._decode = self.artifact.vm["batch_decode"]
        self._params = self.artifact.params
        self._seq_ids = itertools.count()
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []

    # ---- public API ---------------------------------------------------------------------------------
    def generate(
        self, prompts: str | list[str], params: SamplingParams | None = None, raw: bool = True
    ) -> list[Result]:
        """Complete each prompt; all of them run together in one batch."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        requests = [self._submit(self._encode(p, raw), params or SamplingParams(), None) for p in prompts]
        self._run_until_done(requests)
        return [self._result(r) for r in requests]

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams | None = None) -> list[Result]:
        requests = [self._submit(list(ids), params or SamplingParams(), None) for ids in prompt_ids]
        self._run_until_done(requests)
        return [self._result(r) for r in requests]

    def stream(self, prompt: str, params: SamplingParams | None = None, raw: bool = True) -> Iterator[str]:
        """Text pieces as they are generated."""
        return self._stream(self._encode(prompt, raw), params)

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> Iterator[str]:
        """Streams the assistant's reply to a conversation, rendered with the model's chat template."""
        return self._stream(self.tokenizer.encode_chat(messages), params)

    def prefill_logits(self, prompt_ids: list[list[int]]) -> np.ndarray:
        """Last-token logits [batch, vocab] of fresh sequences prefilled together; leaves no state."""
        requests = [_Request(list(ids), SamplingParams(max_tokens=1), None) for ids in prompt_ids]
        for r in requests:
            self._check_fits(r)
            r.seq_id = next(self._seq_ids)
            KV_ADD(self.kv, r.seq_id)
        try:
            return self._prefill_batch(requests)
        finally:
            for r in requests:
                KV_REMOVE(self.kv, r.seq_id)

    # ---- internals ----------------------------------------------------------------------------------
    def _encode(self, prompt: str, raw: bool) -> list[int]:
        if raw:
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])

    def _stream(self, prompt_ids: list[int], params: SamplingParams | None) -> Iterator[str]:
        pieces: deque[str] = deque()
        request = self._submit(prompt_ids, params or SamplingParams(), pieces.append)
        while request.finish_reason is None:
            self.step()
            while pieces:
                yield pieces.popleft()
        while pieces:
            yield pieces.popleft()

    def _check_fits(self, request: _Request) -> None:
        n = len(request.prompt_ids)
        if n == 0:
            raise MlccError("the prompt is empty")
        if n >= self.context_window:
            raise MlccError(f"the prompt has {n} tokens; the context window is {self.context_window}")

    def _submit(self, prompt_ids: list[int], params: SamplingParams, on_text) -> _Request:
        params.validate()
        request = _Request(prompt_ids, params, on_text, rng=np.random.default_rng(params.seed))
        self._check_fits(request)
        # Never let a sequence outgrow the context window.
        request.params.max_tokens = min(params.max_tokens, self.context_window - len(prompt_ids))
        request.decoder = IncrementalDecoder(self.tokenizer, prompt_ids)
        self.waiting.append(request)
        return request

    def _run_until_done(self, requests: list[_Request]) -> None:
        while any(r.finish_reason is None for r in requests):
            self.step()

    def _reserved(self) -> int:
        return sum(r.budget for r in self.running)

    def step(self) -> None:
        """Admit what fits, prefill it, then decode one token for every running request."""
        admitted = []
        while (
            self.waiting
            and len(self.running) + len(admitted) < self.max_batch_size
            and self._reserved() + sum(r.budget for r in admitted) + self.waiting[0].budget <= self.kv_tokens
        ):
            admitted.append(self.waiting.popleft())
        if admitted:
            for r in admitted:
                r.seq_id = next(self._seq_ids)
                KV_ADD(self.kv, r.seq_id)
            logits = self._prefill_batch(admitted)
            self.running.extend(admitted)
            for r, row in zip(admitted, logits):
                self._accept(r, row)
        elif self.running:
            active = list(self.running)
            ids = np.array([r.output_ids[-1] for r in active], dtype="int32")
            logits = self._forward(self._decode, [r.seq_id for r in active], [1] * len(active), ids)
            for r, row in zip(active, logits):
                self._accept(r, row)
        elif self.waiting:
            r = self.waiting[0]
            raise MlccError(f"a request needing {r.budget} tokens does not fit the KV cache ({self.kv_tokens})")
        self.running = [r for r in self.running if r.finish_reason is None]

    def _forward(self, fn, seq_ids: list[int], lengths: list[int], ids: np.ndarray, *extra) -> np.ndarray:
        dev = self.artifact.device
        KV_BEGIN(self.kv, ShapeTuple(seq_ids), ShapeTuple(lengths))
        args = [tvm.runtime.tensor(ids, dev), *[tvm.runtime.tensor(e, dev) for e in extra]]
        logits, self.kv = fn(*args, self.kv, self._params)
        KV_END(self.kv)
        return logits.numpy()

    def _prefill_batch(self, requests: list[_Request]) -> np.ndarray:
        """Prefill prompts in ragged chunks of at most `prefill_chunk` tokens; last-token logits per request."""
        pending = [(i, 0) for i in range(len(requests))]  # (request index, tokens done)
        last: dict[int, np.ndarray] = {}
        while pending:
            budget, batch, next_pending = self.prefill_chunk, [], []
            for i, done in pending:
                take = min(budget, len(requests[i].prompt_ids) - done)
                if take > 0:
                    batch.append((i, done, take))
                    budget -= take
                if done + take < len(requests[i].prompt_ids):
                    next_pending.append((i, done + take))
            ids = np.concatenate([requests[i].prompt_ids[d : d + t] for i, d, t in batch]).astype("int32")
            positions = np.cumsum([t for _, _, t in batch]).astype("int32") - 1
            logits = self._forward(
                self._prefill, [requests[i].seq_id for i, _, _ in batch], [t for _, _, t in batch], ids, positions
            )
            for row, (i, done, take) in enumerate(batch):
                if done + take == len(requests[i].prompt_ids):
                    last[i] = logits[row]
            pending = next_pending
        return np.stack([last[i] for i in range(len(requests))])

    def _accept(self, r: _Request, logits: np.ndarray) -> None:
        """Sample the next token of `r` and apply the stop conditions."""
        token = sample(logits, r.params, r.rng)
        r.output_ids.append(token)
        p = r.params
        if (token in self.tokenizer.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            r.output_ids.pop()
            self._finish(r, "stop")
            return
        assert r.decoder is not None
        r.text += r.decoder.add(token)
        if p.stop:
            cut = min((i for i in (r.text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                r.text = r.text[:cut]
                self._finish(r, "stop")
                return
        if len(r.output_ids) >= p.max_tokens:
            self._finish(r, "length")
            return
        self._emit(r, hold=max((len(s) - 1 for s in p.stop), default=0))

    def _emit(self, r: _Request, hold: int = 0) -> None:
        """Stream new text, holding back a tail that might still become a stop string."""
        upto = len(r.text) - hold
        if r.on_text and upto > r.emitted:
            r.on_text(r.text[r.emitted : upto])
            r.emitted = upto

    def _finish(self, r: _Request, reason: str) -> None:
        r.finish_reason = reason
        self._emit(r)
        KV_REMOVE(self.kv, r.seq_id)

    def _result(self, r: _Request) -> Result:
        return Result(r.text, list(r.output_ids), r.finish_reason or "length", len(r.prompt_ids))
