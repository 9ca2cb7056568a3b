"""An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

The engine runs in one background thread (ServingEngine); handlers submit requests and await their deltas.
Streaming follows OpenAI's Server-Sent Events exactly, and a client that goes away aborts its request, streamed
or not. One client cannot harm another: bodies are capped (413), a request may ask for at most
MAX_SEQUENCES_PER_REQUEST completions, the server holds a bounded number of sequences (429 beyond it),
tokenizing runs off the event loop, a failure inside one request ends that request alone, and no error closes
a keep-alive connection. With an API key every route but /health needs it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from artifacts import MlccError
from runtime.constraints import ConstraintError
from runtime.engine import Delta, Result
from runtime.sampler import SamplingParams, TokenLogprob
from runtime.serving import QueueFull, RequestHandle, ServingEngine
from runtime.tools import ToolCall, ToolCallParser, ToolSpec, template_messages

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left
MAX_BODY_BYTES = 4 << 20  # a request body above this is refused with 413 before it is parsed
MAX_SEQUENCES_PER_REQUEST = 128  # prompts x n of one request
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
SHUTDOWN_GRACE_S = 5  # on SIGTERM: in-flight work is aborted at once; connections get this long to close


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def internal_error(e: BaseException) -> ApiError:
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413, counting what arrives (Content-Length may be absent or lie).
    The body is read here whole, then handed on; later reads go to the client (to see a disconnect)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(scope, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        error = ApiError(413, f"the request body is larger than {self.limit} bytes", code="request_too_large")
        await error.response()(scope, _nothing, send)


async def _nothing() -> Message:
    return {"type": "http.disconnect"}


class ApiKeyGuard:
    """Every route but /health needs `Authorization: Bearer KEY` (/metrics and the schema too)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope.get("headers", [])).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = ApiError(401, "invalid or missing API key", code="invalid_api_key")
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class CatchAll:
    """The last line of defence: an unexpected exception becomes a 500 in OpenAI's shape, and the connection
    stays open (Starlette's own handler re-raises, which makes the server drop keep-alive connections)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            if scope["type"] == "http" and not started:
                await internal_error(e).response()(scope, receive, send)


# ---- request bodies ---------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class CommonFields(BaseModel):
    """Sampling fields both endpoints share; unknown fields (e.g. `user`) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    # Beyond OpenAI, with vLLM's names.
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    # Structured output: OpenAI's response_format, or vLLM's guided_* fields (a regex, a Lark or GBNF grammar).
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None

    def json_schema(self) -> dict[str, Any] | bool | str | None:
        if self.guided_json is not None or self.response_format is None:
            return self.guided_json
        if self.response_format.type == "json_object":
            return {"type": "object"}
        if self.response_format.type == "json_schema":
            given = self.response_format.json_schema
            return given.schema_ if given is not None and given.schema_ is not None else {"type": "object"}
        return None

    def constraint_field(self) -> str | None:
        """The field that holds the request's constraint (named by a 400 when it is invalid)."""
        if self.guided_json is not None or self.guided_regex is not None or self.guided_grammar is not None:
            return next(f for f in ("guided_json", "guided_regex", "guided_grammar") if getattr(self, f) is not None)
        return "response_format" if self.json_schema() is not None else None

    def sampling(self, max_tokens: int, logprobs: bool, top_logprobs: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=dict(self.logit_bias or {}),
            n=self.n,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            json_schema=self.json_schema(),  # type: ignore[arg-type]
            regex=self.guided_regex,
            grammar=self.guided_grammar,
        )


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        extra = {k: v for k, v in (self.model_extra or {}).items() if k in ("tool_calls", "tool_call_id", "name")}
        return {"role": self.role, "content": content or "", **extra}


class FunctionDefinition(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(CommonFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    def tool_spec(self) -> ToolSpec | None:
        tools = [t.model_dump(exclude_none=True) for t in self.tools or []]
        try:
            return ToolSpec.parse(tools, self.tool_choice, self.parallel_tool_calls)
        except MlccError as e:
            raise ApiError(400, str(e), param="tool_choice" if "tool_choice" in str(e) else "tools") from None


class CompletionRequest(CommonFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # the legacy API's number of alternatives per token
    echo: bool = False


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
    app.add_middleware(BodyLimit)
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

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "mlcc"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    def check_model(name: str) -> None:
        if name not in names:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server has {model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def submit(
        prompt_ids: list[int], params: SamplingParams, prompt_field: str, constraint_field: str | None = None
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
            return await run_in_threadpool(serving.submit, prompt_ids, params, asyncio.get_running_loop())
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
        check_model(body.model)
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
        handle = await submit(prompt_ids, params, "messages", constraint_field)
        reply = ChatReply(
            engine, model_name, want_logprobs, tools if tools is not None and tools.parses_calls else None
        )
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(reply.chunks([handle], include_usage), [handle])
        return reply.response(await collect([handle], request), [handle])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
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
                handles.append(await submit(list(ids), params, "prompt", body.constraint_field()))  # type: ignore
        except ApiError:
            for handle in handles:
                handle.abort()
            raise
        reply = CompletionReply(engine, model_name, body.logprobs is not None)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(reply.chunks(handles, include_usage), handles)
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


def usage(handles: list[RequestHandle], results: list[Result]) -> dict[str, Any]:
    """OpenAI counts each prompt once, however many completions it has."""
    prompt = sum(h.prompt_tokens for h in handles)
    completion = sum(len(r.token_ids) for r in results)
    cached = sum(h.cached_tokens for h in handles)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class Reply:
    """Shapes results and deltas into one endpoint's response objects."""

    object_name = ""
    id_prefix = ""

    def __init__(self, engine: Any, model_name: str, logprobs: bool):
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.logprobs = logprobs
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.tok.decode([token_id], skip_special_tokens=False)

    def envelope(self, choices: list[dict[str, Any]], chunk: bool = False) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object_name + (".chunk" if chunk and self.object_name == "chat.completion" else ""),
            "created": self.created,
            "model": self.model_name,
            "system_fingerprint": None,
            "choices": choices,
        }

    def choice(
        self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish: str | None, delta: bool
    ) -> dict[str, Any]:
        raise NotImplementedError

    def response(self, results: list[Result], handles: list[RequestHandle]) -> dict[str, Any]:
        choices = [self.result_choice(i, r) for i, r in enumerate(results)]
        return {**self.envelope(choices), "usage": usage(handles, results)}

    def result_choice(self, index: int, result: Result) -> dict[str, Any]:
        return self.choice(index, result.text, result.logprobs, result.finish_reason, delta=False)

    def delta_choices(self, index: int, delta: Delta) -> list[dict[str, Any]]:
        """The chunks' choices for one delta: its text (and logprobs), then its finish reason on its own."""
        out = []
        if delta.text or (self.logprobs and delta.logprobs):
            out.append(self.choice(index, delta.text, delta.logprobs, None, delta=True))
        if delta.finish_reason:  # in a chunk of its own, as OpenAI sends it
            out.append(self.choice(index, "", None, delta.finish_reason, delta=True))
        return out

    async def chunks(self, handles: list[RequestHandle], include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        extra = {"usage": None} if include_usage else {}
        for first in self.opening(sum(len(h.requests) for h in handles)):
            yield {**self.envelope([first], chunk=True), **extra}
        async for index, delta in merged(handles):
            if delta.error is not None:
                raise ApiError(500, f"the request failed: {delta.error}", kind="server_error")
            for choice in self.delta_choices(index, delta):
                yield {**self.envelope([choice], chunk=True), **extra}
        if include_usage:
            results = [r for h in handles for r in h.results()]
            yield {**self.envelope([], chunk=True), "usage": usage(handles, results)}

    def opening(self, choices: int) -> list[dict[str, Any]]:
        """Choices to send before any text (chat announces the role)."""
        return []


class ChatReply(Reply):
    object_name = "chat.completion"
    id_prefix = "chatcmpl"

    def __init__(self, engine: Any, model_name: str, logprobs: bool, tools: ToolSpec | None = None):
        """`tools`: when set, the replies' tool calls are parsed out of their text into `tool_calls`."""
        super().__init__(engine, model_name, logprobs)
        self.tools = tools
        self.parsers: dict[int, ToolCallParser] = {}

    def result_choice(self, index: int, result: Result) -> dict[str, Any]:
        if self.tools is None:
            return super().result_choice(index, result)
        parser = ToolCallParser(self.tools)
        text, calls = parser.feed(result.text)
        rest, more = parser.finish()
        choice = self.choice(index, text + rest, result.logprobs, result.finish_reason, delta=False)
        if calls + more:
            choice["message"]["content"] = (text + rest) or None
            choice["message"]["tool_calls"] = [c.as_openai() for c in calls + more]
            choice["finish_reason"] = "tool_calls" if result.finish_reason == "stop" else result.finish_reason
        return choice

    def delta_choices(self, index: int, delta: Delta) -> list[dict[str, Any]]:
        """With tools: text that may be a call is held back; a call goes out as OpenAI streams one (its id and
        name with empty arguments, then its arguments), and the finish reason is then "tool_calls"."""
        if self.tools is None:
            return super().delta_choices(index, delta)
        parser = self.parsers.setdefault(index, ToolCallParser(self.tools))
        text, calls = parser.feed(delta.text)
        if delta.finish_reason:
            rest, more = parser.finish()
            text, calls = text + rest, calls + more
        out = []
        if text or (self.logprobs and delta.logprobs):
            out.append(self.choice(index, text, delta.logprobs, None, delta=True))
        first = len(parser.calls) - len(calls)
        for k, call in enumerate(calls, start=first):
            out += [self.call_chunk(index, k, call, header=True), self.call_chunk(index, k, call, header=False)]
        if delta.finish_reason:
            reason = "tool_calls" if parser.calls and delta.finish_reason == "stop" else delta.finish_reason
            out.append(self.choice(index, "", None, reason, delta=True))
        return out

    @staticmethod
    def call_chunk(index: int, k: int, call: ToolCall, header: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"index": k, "function": {"arguments": "" if header else call.arguments}}
        if header:
            entry.update(id=call.id, type="function")
            entry["function"] = {"name": call.name, "arguments": ""}
        return {"index": index, "delta": {"tool_calls": [entry]}, "logprobs": None, "finish_reason": None}

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def choice(
        self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish: str | None, delta: bool
    ) -> dict[str, Any]:
        content = None
        if self.logprobs and logprobs is not None:
            content = {
                "content": [
                    {**self.entry(t.token_id, t.logprob), "top_logprobs": [self.entry(i, lp) for i, lp in t.top]}
                    for t in logprobs
                ]
            }
        body = {"content": text} if delta else {"role": "assistant", "content": text}
        if delta and not text:
            body = {}
        return {"index": index, "delta" if delta else "message": body, "logprobs": content, "finish_reason": finish}

    def opening(self, choices: int) -> list[dict[str, Any]]:
        role = {"role": "assistant", "content": ""}
        return [{"index": i, "delta": role, "logprobs": None, "finish_reason": None} for i in range(choices)]


class CompletionReply(Reply):
    object_name = "text_completion"
    id_prefix = "cmpl"

    def choice(
        self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish: str | None, delta: bool
    ) -> dict[str, Any]:
        legacy = None
        if self.logprobs and logprobs is not None:
            tokens = [self.token_text(t.token_id) for t in logprobs]
            offsets = [sum(len(x) for x in tokens[:k]) for k in range(len(tokens))]
            legacy = {
                "tokens": tokens,
                "token_logprobs": [t.logprob for t in logprobs],
                "top_logprobs": [{self.token_text(i): lp for i, lp in t.top} for t in logprobs],
                "text_offset": offsets,
            }
        return {"index": index, "text": text, "logprobs": legacy, "finish_reason": finish}


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
