"""OpenAI's API as data: request bodies (validated into SamplingParams, with tools and response_format), errors in
OpenAI's shape, and the reply objects (whole responses and stream chunks) shaped from the engine's results and deltas.
Nothing here serves HTTP; runtime/server.py routes requests through these.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from artifacts import MlccError
from runtime.engine import Delta, Result
from runtime.sampler import SamplingParams, TokenLogprob
from runtime.serving import RequestHandle
from runtime.tools import ToolCall, ToolCallParser, ToolSpec


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


# ---- replies ----------------------------------------------------------------------------------------------
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

    async def chunks(
        self, deltas: AsyncIterator[tuple[int, Delta]], handles: list[RequestHandle], include_usage: bool
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream chunks for `deltas` ((choice index, delta) from `handles`, as they come), then the usage."""
        extra = {"usage": None} if include_usage else {}
        for first in self.opening(sum(len(h.requests) for h in handles)):
            yield {**self.envelope([first], chunk=True), **extra}
        async for index, delta in deltas:
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
