"""An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

Routes, metrics and the app factory live here; OpenAI's request and reply shapes in runtime/openai_protocol.py,
the ASGI middlewares in runtime/middleware.py. The engine runs in one background thread (ServingEngine); handlers
submit requests and await their deltas. Streaming follows OpenAI's Server-Sent Events exactly, and a client that
goes away aborts its request, streamed or not. One client cannot harm another: bodies are capped (413), a request
may ask for at most MAX_SEQUENCES_PER_REQUEST completions, the server holds a bounded number of sequences (429
beyond it), tokenizing runs off the event loop, a failure inside one request ends that request alone, and no error
closes a keep-alive connection. With an API key every route but /health needs it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from artifacts import MlccError
from runtime.constraints import ConstraintError
from runtime.engine import Delta, Result
from runtime.middleware import ApiKeyGuard, BodyLimit, CatchAll
from runtime.openai_protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatReply,
    CompletionReply,
    CompletionRequest,
    internal_error,
)
from runtime.sampler import SamplingParams
from runtime.serving import QueueFull, RequestHandle, ServingEngine
from runtime.tools import template_messages

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left
MAX_BODY_BYTES = 4 << 20  # a request body above this is refused with 413 before it is parsed
MAX_SEQUENCES_PER_REQUEST = 128  # prompts x n of one request
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
SHUTDOWN_GRACE_S = 5  # on SIGTERM: in-flight work is aborted at once; connections get this long to close


# ---- the app ----------------------------------------------------------------------------------------------
def create_app(serving: ServingEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app around a running ServingEngine; `model_name` is what clients pass as `model`."""
    engine = serving.engine
    names = {model_name, engine.artifact.manifest.arch}
    created = int(time.time())
    app = FastAPI(title="mlcc", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {first.get('msg')}").response()
        fields = [str(x) for x in first.get("loc", ()) if x != "body"]
        if not fields:
            return ApiError(400, "the body must be a JSON object, sent as Content-Type: application/json").response()
        param = ".".join(fields) or None
        return ApiError(422, f"{param or 'body'}: {first.get('msg')}", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail)).response()

    # Plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide a client's disconnect from the routes.
    # Each one added wraps those before it: errors caught outermost, the key checked before a body is read.
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    if api_key:
        app.add_middleware(ApiKeyGuard, api_key=api_key)
    app.add_middleware(CatchAll)

    @app.get("/health")
    async def health() -> JSONResponse:
        problem = (
            "the engine thread has stopped"
            if not serving.alive
            else "the server is shutting down"
            if serving.closing
            else f"the model failed to run: {serving.model_error}"
            if serving.model_error
            else None
        )
        if problem:
            return ApiError(503, problem, kind="server_error").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(serving), media_type="text/plain; version=0.0.4")

    def model_card(name: str) -> dict[str, Any]:
        """The base model, or a LoRA adapter or X-LoRA model loaded on it (its parent)."""
        card = {"id": name, "object": "model", "created": created, "owned_by": "mlcc"}
        return card if name == model_name else {**card, "parent": model_name}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in [model_name, *engine.adapters.names]]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        return model_card(model_name if check_model(name) is None else name)

    def check_model(name: str) -> str | None:
        """The adapter a request's `model` names (None: the base model); a 404 for other names."""
        if name in engine.adapters.names:
            return name
        if name not in names:
            adapters = "".join(f", {a!r}" for a in engine.adapters.names)
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server has {model_name!r}{adapters}",
                param="model",
                code="model_not_found",
            )
        return None

    async def submit(
        prompt_ids: list[int],
        params: SamplingParams,
        prompt_field: str,
        constraint_field: str | None = None,
        adapter: str | None = None,
    ) -> RequestHandle:
        """Queue a prompt; what the user got wrong becomes a 400 naming the field, a full server a 429.
        Runs off the event loop: compiling a grammar can take a while."""
        if len(prompt_ids) >= engine.context_window:
            raise ApiError(
                400,
                f"the prompt has {len(prompt_ids)} tokens; this model's context window is {engine.context_window}",
                param=prompt_field,
                code="context_length_exceeded",
            )
        try:
            return await run_in_threadpool(serving.submit, prompt_ids, params, asyncio.get_running_loop(), adapter)
        except QueueFull as e:
            raise ApiError(429, str(e), kind="server_busy", code="rate_limit_exceeded") from None
        except ConstraintError as e:
            raise ApiError(400, str(e), param=constraint_field) from None
        except MlccError as e:
            if serving.closing:
                raise ApiError(503, str(e), kind="server_error") from None
            field = str(e).split()[0]
            raise ApiError(400, str(e), param=field if field in SamplingParams.__dataclass_fields__ else None) from None

    async def tokenized(encode: Any, value: Any, field: str) -> list[int]:
        """Token ids, computed off the event loop (a long text takes seconds); bad text is a 400."""
        try:
            return await run_in_threadpool(encode, value)
        except MlccError as e:
            raise ApiError(400, str(e), param=field) from None

    def check_sequences(prompts: int, n: int) -> None:
        if prompts * n > MAX_SEQUENCES_PER_REQUEST:
            raise ApiError(
                400,
                f"{prompts} prompts x n={n} asks for {prompts * n} completions; at most {MAX_SEQUENCES_PER_REQUEST}",
                param="n",
            )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        adapter = check_model(body.model)
        check_sequences(1, body.n)
        tools = body.tool_spec()
        messages = [m.as_template_input() for m in body.messages]
        template = engine.tokenizer.chat_template
        if template is not None and (tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)):
            try:
                messages, rendered_tools = template_messages(messages, tools, template.source)
            except MlccError as e:
                raise ApiError(400, str(e), param="messages") from None
            prompt_ids = await tokenized(
                lambda m: engine.tokenizer.encode_chat(m, rendered_tools), messages, "messages"
            )
        else:
            prompt_ids = await tokenized(engine.tokenizer.encode_chat, messages, "messages")
        want_logprobs = body.logprobs or bool(body.top_logprobs)
        max_tokens = next((m for m in (body.max_completion_tokens, body.max_tokens) if m is not None), None)
        # Omitted: the rest of the context; 0 or less is a 400, as on /v1/completions.
        params = body.sampling(
            engine.context_window if max_tokens is None else max_tokens, want_logprobs, body.top_logprobs or 0
        )
        constraint_field = body.constraint_field()
        if tools is not None and tools.forced:
            if constraint_field is not None:
                raise ApiError(
                    400, f"tool_choice forces a tool call: {constraint_field} cannot apply", param="tool_choice"
                )
            params.grammar, constraint_field = tools.grammar(), "tools"
        handle = await submit(prompt_ids, params, "messages", constraint_field, adapter)
        reply = ChatReply(
            engine, adapter or model_name, want_logprobs, tools if tools is not None and tools.parses_calls else None
        )
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(reply.chunks(merged([handle]), [handle], include_usage), [handle])
        return reply.response(await collect([handle], request), [handle])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        adapter = check_model(body.model)
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        prompts = body.prompt if isinstance(body.prompt, list) and body.prompt else [body.prompt]
        if isinstance(prompts[0], int):
            prompts = [prompts]
        check_sequences(len(prompts), body.n)
        top = body.logprobs or 0
        max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
        params = body.sampling(max_tokens, body.logprobs is not None, top)
        handles = []
        try:
            for prompt in prompts:
                ids = await tokenized(engine.tokenizer.encode, prompt, "prompt") if isinstance(prompt, str) else prompt
                if not ids:
                    raise ApiError(400, "the prompt is empty", param="prompt")
                field = body.constraint_field()
                handles.append(await submit(list(ids), params, "prompt", field, adapter))  # type: ignore
        except ApiError:
            for handle in handles:
                handle.abort()
            raise
        reply = CompletionReply(engine, adapter or model_name, body.logprobs is not None)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(reply.chunks(merged(handles), handles, include_usage), handles)
        return reply.response(await collect(handles, request), handles)

    return app


# ---- running requests -------------------------------------------------------------------------------------
async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) from several prompts' handles as they come; choice = prompt * n + completion."""
    if len(handles) == 1:
        async for item in handles[0]:
            yield item
        return
    queue: asyncio.Queue[Any] = asyncio.Queue()
    per_prompt = len(handles[0].requests)

    async def pump(k: int, handle: RequestHandle) -> None:
        try:
            async for i, delta in handle:
                queue.put_nowait((k * per_prompt + i, delta))
        except Exception as e:  # handed on to the consumer
            queue.put_nowait(e)
        queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(k, h)) for k, h in enumerate(handles)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


async def collect(handles: list[RequestHandle], request: Request) -> list[Result]:
    """Wait for every completion; a client that disconnects meanwhile aborts them (as a stream's would)."""

    async def drain() -> None:
        async for _ in merged(handles):
            pass

    async def client_gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    work, watch = asyncio.create_task(drain()), asyncio.create_task(client_gone())
    try:
        await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        for handle in handles:
            handle.abort()
    await work  # after an abort the handles finish promptly
    results = [r for handle in handles for r in handle.results()]
    failed = next((r for r in results if r.finish_reason == "error"), None)
    if failed is not None:
        raise ApiError(500, f"the request failed: {failed.error}", kind="server_error")
    return results


def event_stream(chunks: AsyncIterator[dict[str, Any]], handles: list[RequestHandle]) -> StreamingResponse:
    """Server-Sent Events as OpenAI sends them; when the client disconnects, the requests are aborted."""

    async def lines() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as e:  # the status line is gone already: report it in the stream, as OpenAI does
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception as e:
            yield f"data: {json.dumps(internal_error(e).body())}\n\n"
        finally:
            for handle in handles:
                handle.abort()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(lines(), media_type="text/event-stream", headers=headers)


def prometheus_text(serving: ServingEngine) -> str:
    """The engine's counters and gauges in Prometheus' text format."""
    stats = serving.stats
    metrics = [
        ("requests_running", "gauge", "Requests being prefilled or decoded.", stats["requests_running"]),
        ("requests_waiting", "gauge", "Requests queued for a batch slot or KV pages.", stats["requests_waiting"]),
        (
            "kv_cache_tokens_used",
            "gauge",
            "KV cache tokens in use (running and cached).",
            stats["kv_cache_tokens_used"],
        ),
        ("kv_cache_tokens_total", "gauge", "KV cache capacity in tokens.", stats["kv_cache_tokens_total"]),
        ("prefix_cache_sequences", "gauge", "Finished sequences kept for prefix reuse.", stats["cached_sequences"]),
        ("requests_total", "counter", "Requests started.", stats["requests_total"]),
        ("prompt_tokens_total", "counter", "Prompt tokens of started requests.", stats["prompt_tokens_total"]),
        (
            "cached_prompt_tokens_total",
            "counter",
            "Prompt tokens served from the prefix cache.",
            stats["cached_prompt_tokens_total"],
        ),
        ("requests_aborted_total", "counter", "Requests aborted (e.g. clients gone).", stats["aborted_requests_total"]),
        (
            "requests_preempted_total",
            "counter",
            "Running requests whose KV was dropped to free pages (recomputed later).",
            stats["preemptions_total"],
        ),
        ("generation_tokens_total", "counter", "Generated tokens.", stats["generated_tokens_total"]),
        ("draft_tokens_total", "counter", "Tokens drafted for speculative decoding.", stats["draft_tokens_total"]),
        (
            "accepted_draft_tokens_total",
            "counter",
            "Drafted tokens the model kept (speculative decoding).",
            stats["accepted_draft_tokens_total"],
        ),
        (
            "generation_tokens_per_second",
            "gauge",
            "Generated tokens per second over the last 10 s.",
            round(serving.tokens_per_second(), 3),
        ),
    ]
    lines = []
    for name, kind, help_text, value in metrics:
        lines += [f"# HELP mlcc_{name} {help_text}", f"# TYPE mlcc_{name} {kind}", f"mlcc_{name} {value}"]
    return "\n".join(lines) + "\n"


def serve(
    artifact: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    **engine_options: Any,
) -> None:
    """Load the artifact, check that its model runs, and serve it until interrupted (SIGINT or SIGTERM)."""
    serving = ServingEngine(artifact, **engine_options)
    try:
        serving.engine.self_check()
        serving.engine.constraints.warm_up()
        app = create_app(serving, Path(artifact).resolve().name, api_key)
        config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        PromptShutdownServer(config, serving).run()
    finally:
        serving.close()


class PromptShutdownServer(uvicorn.Server):
    """uvicorn's server, but a shutdown signal first aborts every queued and running request, so open
    connections end within moments instead of after their generations."""

    def __init__(self, config: Any, serving: ServingEngine):
        super().__init__(config)
        self.serving = serving

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.serving.abort_all()
        super().handle_exit(sig, frame)
