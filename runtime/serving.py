"""A thread-safe front for the engine: one background thread owns the Engine and loops `step()`.

Callers on any thread, or on an asyncio loop, submit requests and receive their deltas through queues;
the engine thread never waits on them.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from artifacts import MlccError
from runtime.engine import Delta, Engine, Request, Result, set_threads
from runtime.sampler import SamplingParams

_STOP = object()
RATE_WINDOW_S = 10.0
DEFAULT_MAX_QUEUED_PER_SLOT = 16  # sequences in flight per batch slot before new requests are refused


class QueueFull(MlccError):
    """The server holds as many sequences as it may; the client should retry later (HTTP 429)."""


class RequestHandle:
    """The `n` completions of one prompt in flight. Iterate it (sync or async) for (index, Delta) pairs."""

    def __init__(self, server: ServingEngine, loop: asyncio.AbstractEventLoop | None):
        self._server = server
        self._loop = loop
        self._sync_queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._async_queue: asyncio.Queue[Any] | None = asyncio.Queue() if loop else None
        self.requests: list[Request] = []
        self._open = 0

    # Called on the engine thread.
    def _deliver(self, item: tuple[int, Delta] | BaseException) -> None:
        if self._loop is None:
            self._sync_queue.put(item)
        else:
            assert self._async_queue is not None
            try:
                self._loop.call_soon_threadsafe(self._async_queue.put_nowait, item)
            except RuntimeError:  # the caller's loop has closed; nobody is listening any more
                pass

    def _callback(self, index: int) -> Callable[[Delta], None]:
        def on_delta(delta: Delta) -> None:
            if delta.finish_reason is not None:
                self._server._sequences_done(1)
            self._deliver((index, delta))

        return on_delta

    def _take(self, item: tuple[int, Delta] | BaseException) -> tuple[int, Delta]:
        if isinstance(item, BaseException):
            raise item
        if item[1].finish_reason is not None:
            self._open -= 1
        return item

    def __iter__(self) -> Iterator[tuple[int, Delta]]:
        while self._open:
            yield self._take(self._sync_queue.get())

    async def __aiter__(self) -> AsyncIterator[tuple[int, Delta]]:
        assert self._async_queue is not None, "submitted without an event loop"
        while self._open:
            yield self._take(await self._async_queue.get())

    @property
    def done(self) -> bool:
        return self._open == 0

    def results(self) -> list[Result]:
        """The finished completions, in index order; only once iteration has ended."""
        assert self.done, "the request is still running"
        return [r.result() for r in self.requests]

    @property
    def prompt_tokens(self) -> int:
        return len(self.requests[0].prompt_ids)

    @property
    def cached_tokens(self) -> int:
        return self.requests[0].cached_tokens

    def abort(self) -> None:
        """Stop all completions and free their KV at once (e.g. the client went away); harmless when done."""
        if not self.done:
            self._server._post(lambda: [self._server.engine.abort(r) for r in self.requests])


class ServingEngine:
    """Runs an Engine in a background thread; every method is safe from any thread or asyncio task.

    Async: `await generate(...)`, `async for piece in stream(...)`, `chat(...)`; blocking: the `_sync` twins.
    """

    def __init__(self, engine: Engine | str | Path, max_queued: int | None = None, **engine_options: Any):
        """`max_queued`: the most sequences (prompts x n) in flight, running or waiting; beyond it `submit`
        raises QueueFull, so that one client cannot queue unbounded work."""
        self.engine = engine if isinstance(engine, Engine) else Engine(engine, **engine_options)
        self.max_queued = max_queued or DEFAULT_MAX_QUEUED_PER_SLOT * self.engine.max_batch_size
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.closing = False
        self.model_error: str | None = None  # set when a model step failed: the server is then unhealthy
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._handles: set[RequestHandle] = set()
        self._token_times: collections.deque[tuple[float, int]] = collections.deque()
        self.stats: dict[str, float] = {}
        self._update_stats()
        self._thread = threading.Thread(target=self._loop, name="mlcc-engine", daemon=True)
        self._thread.start()

    # ---- submitting ---------------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None = None,
        adapter: str | None = None,
    ) -> RequestHandle:
        """Queue `params.n` completions of a prompt (with the LoRA adapter named `adapter`, if any); deltas go to
        `loop` when given, else to a blocking queue.

        Bad input raises MlccError here, in the caller's thread.
        """
        handle = RequestHandle(self, loop)
        handle.requests = self.engine.make_requests(prompt_ids, params, adapter=adapter)
        self.reserve(len(handle.requests))
        for i, r in enumerate(handle.requests):
            r.on_delta = handle._callback(i)
        handle._open = len(handle.requests)

        def start() -> None:  # an abort may have come first
            self._handles.add(handle)
            self.engine.enqueue([r for r in handle.requests if r.finish_reason is None])

        self._post(start)
        return handle

    def reserve(self, sequences: int) -> None:
        """Count `sequences` as in flight, or raise QueueFull (or MlccError when shutting down)."""
        if self.closing:
            raise MlccError("the server is shutting down")
        with self._in_flight_lock:
            if self._in_flight + sequences > self.max_queued:
                raise QueueFull(
                    f"the server is busy ({self._in_flight} sequences in flight, at most {self.max_queued}); "
                    "retry later"
                )
            self._in_flight += sequences

    def _sequences_done(self, sequences: int) -> None:
        with self._in_flight_lock:
            self._in_flight -= sequences

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def encode(self, prompt: str | list[int] | list[dict[str, Any]], raw: bool = True) -> list[int]:
        """Token ids of a prompt: text (raw, or as one user message), ids as they are, or chat messages."""
        tokenizer = self.engine.tokenizer
        if isinstance(prompt, str):
            return tokenizer.encode(prompt) if raw else tokenizer.encode_chat([{"role": "user", "content": prompt}])
        if prompt and isinstance(prompt[0], dict):
            return tokenizer.encode_chat(prompt)  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    # ---- asyncio API --------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None, raw: bool = True):
        """All `params.n` completions of the prompt."""
        handle = self.submit(self.encode(prompt, raw), params or SamplingParams(), asyncio.get_running_loop())
        try:
            async for _ in handle:
                pass
        finally:
            handle.abort()
        return handle.results()

    async def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None, raw: bool = True
    ) -> AsyncIterator[str]:
        """Text pieces of one completion; closing the generator early (a consumer gone) aborts the request."""
        handle = self.submit(self.encode(prompt, raw), params or SamplingParams(), asyncio.get_running_loop())
        try:
            async for _, delta in handle:
                if delta.text:
                    yield delta.text
        finally:
            handle.abort()

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> AsyncIterator[str]:
        """Streams the assistant's reply, rendered with the model's chat template."""
        return self.stream(self.engine.tokenizer.encode_chat(messages), params)

    # ---- blocking API -------------------------------------------------------------------------------
    def generate_sync(self, prompt: str | list[int], params: SamplingParams | None = None, raw: bool = True):
        handle = self.submit(self.encode(prompt, raw), params or SamplingParams())
        for _ in handle:
            pass
        return handle.results()

    def stream_sync(
        self, prompt: str | list[int], params: SamplingParams | None = None, raw: bool = True
    ) -> Iterator[str]:
        handle = self.submit(self.encode(prompt, raw), params or SamplingParams())
        try:
            for _, delta in handle:
                if delta.text:
                    yield delta.text
        finally:
            handle.abort()

    def chat_sync(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> Iterator[str]:
        return self.stream_sync(self.engine.tokenizer.encode_chat(messages), params)

    # ---- lifecycle ----------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def abort_all(self) -> None:
        """Refuse new requests and abort every queued and running one (e.g. on SIGTERM); returns at once."""
        self.closing = True
        self._post(lambda: self._abort_all(None))

    def close(self) -> None:
        """Abort what is in flight and stop the engine thread."""
        self.closing = True
        if self.alive:
            self._inbox.put(_STOP)
            self._thread.join()

    def __enter__(self) -> ServingEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the engine thread --------------------------------------------------------------------------
    def _post(self, command: Callable[[], Any]) -> None:
        self._inbox.put(command)

    def _loop(self) -> None:
        set_threads(self.engine.threads)  # TVM's thread pool is per thread
        while True:
            try:  # commands first; step only when none is pending
                command = self._inbox.get(block=not self.engine.has_work)
            except queue.Empty:
                command = None
            if command is _STOP:
                self._abort_all(None)
                return
            try:
                if command is not None:
                    command()
                else:
                    self.engine.step()
                    self.model_error = None
            except Exception as e:  # a failing step must not hang the callers: fail what is in flight
                self.model_error = f"{type(e).__name__}: {e}"
                self._abort_all(e)
            self._handles = {h for h in self._handles if any(r.finish_reason is None for r in h.requests)}
            self._update_stats()

    def _abort_all(self, error: Exception | None) -> None:
        for handle in list(self._handles):
            if error is not None:
                handle._deliver(error)
            for r in handle.requests:
                try:
                    self.engine.abort(r)
                except Exception:  # the KV state may be broken; the request is over either way
                    if r.finish_reason is None:
                        r.finish_reason = "abort"
                        self._sequences_done(1)
        self._handles.clear()

    def _update_stats(self) -> None:
        """A snapshot for other threads (e.g. /metrics): they must not call into the engine."""
        e = self.engine
        now, generated = time.monotonic(), e.counters["generated_tokens"]
        if not self._token_times or self._token_times[-1][1] != generated:
            self._token_times.append((now, generated))
        while len(self._token_times) > 1 and now - self._token_times[1][0] > RATE_WINDOW_S:
            self._token_times.popleft()
        self.stats = {
            "requests_running": len(e.running),
            "requests_waiting": len(e.waiting),
            "kv_cache_tokens_used": e.kv_tokens_used,
            "kv_cache_tokens_total": e.kv.total_pages * e.page_size,
            "cached_sequences": len(e.cached),
            "requests_total": e.counters["requests"],
            "prompt_tokens_total": e.counters["prompt_tokens"],
            "cached_prompt_tokens_total": e.counters["cached_tokens"],
            "generated_tokens_total": generated,
            "aborted_requests_total": e.counters["aborted"],
            "preemptions_total": e.counters["preemptions"],
            "draft_tokens_total": e.counters["drafted_tokens"],
            "accepted_draft_tokens_total": e.counters["accepted_tokens"],
        }

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last RATE_WINDOW_S seconds."""
        samples, now = list(self._token_times), time.monotonic()
        if not samples:
            return 0.0
        window_start = now - RATE_WINDOW_S
        before = [s for s in samples if s[0] <= window_start]
        base_time, base_count = (window_start, before[-1][1]) if before else samples[0]
        return (samples[-1][1] - base_count) / max(now - base_time, 1e-9)
