"""Tool calling as OpenAI's /v1/chat/completions does it: `tools`, `tool_choice`, `tool_calls` in replies.

The model calls a tool by writing `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (the Hermes
format, which Qwen 2/2.5, Hermes and SmolLM3 are trained on). A chat template that knows tools (it mentions
`tools`) renders them and the conversation's calls itself; for one that does not, the tools are described in
a system message and earlier calls and results are written in that same format. With tool_choice "required"
or a named function the output is constrained to such calls by a grammar, so their arguments are valid
against the function's JSON schema; with "auto" the model's text is parsed, and what is not a well-formed call
of a known function stays text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from artifacts.errors import MlccError
from runtime.constraints import JSON_DEFAULTS, closed

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# In a call's body: a whole JSON string (which may hold the closing tag as text), an unterminated one, or the tag.
_STRING_OR_CLOSE = re.compile(r'"(?:[^"\\]|\\.)*"|(")|' + re.escape(CLOSE), re.S)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolSpec:
    """A request's tools (OpenAI's `tools` entries) and what `tool_choice` asks: "auto", "none", "required", or
    the name of the function that must be called."""

    tools: list[dict[str, Any]]
    choice: str = "auto"
    forced_name: str | None = None
    parallel: bool = True

    @classmethod
    def parse(cls, tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool) -> ToolSpec | None:
        """The request's tools, checked; None when it has none (or tool_choice is "none" without tools)."""
        if not tools:
            if tool_choice not in (None, "none"):
                raise MlccError("tool_choice needs tools")
            return None
        for tool in tools:
            name = tool["function"]["name"]
            if not NAME_PATTERN.match(name):
                raise MlccError(f"tools: function name {name!r} must be 1-64 letters, digits, _ or -")
            parameters = tool["function"].get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise MlccError(f"tools: the parameters of {name!r} must be a JSON schema object")
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) != len(names):
            raise MlccError("tools: function names must be unique")
        if tool_choice is None or isinstance(tool_choice, str):
            choice = tool_choice or "auto"
            if choice not in ("auto", "none", "required"):
                raise MlccError('tool_choice must be "auto", "none", "required" or a function')
            return cls(tools, choice, None, parallel)
        name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
        if name not in names:
            raise MlccError(f"tool_choice names the function {name!r}, which is not among the tools")
        return cls(tools, "function", name, parallel)

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    def grammar(self) -> str | None:
        """The Lark grammar that forces calls (required: one or more, one when not parallel; a named
        function: exactly one of it), each call's JSON valid against its function's schema; None for auto."""
        if not self.forced:
            return None
        tools = [t for t in self.tools if self.forced_name in (None, t["function"]["name"])]
        rules = []
        for i, tool in enumerate(tools):
            function = tool["function"]
            schema = {
                "type": "object",
                "properties": {
                    "name": {"const": function["name"]},
                    "arguments": closed(function.get("parameters") or {"type": "object"}),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
                "x-guidance": JSON_DEFAULTS,
            }
            rules.append(f"call_{i}: %json {json.dumps(schema)}")
        alternatives = " | ".join(f"call_{i}" for i in range(len(tools)))
        repeat = ' ("\\n" call)*' if self.parallel and self.forced_name is None else ""
        return "\n".join([f"start: call{repeat}", f'call: "{OPEN}\\n" ({alternatives}) "\\n{CLOSE}"', *rules])


def system_prompt(tools: list[dict[str, Any]]) -> str:
    """How the tools are described to a model whose chat template does not know tools."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return (
        "You can call these functions (JSON signatures):\n"
        f"<tools>\n{listing}\n</tools>\n"
        "To call one, reply with only a JSON object of its name and arguments in tags, like this:\n"
        f'{OPEN}\n{{"name": "function_name", "arguments": {{"argument": "value"}}}}\n{CLOSE}\n'
        "A function's result comes back to you in <tool_response></tool_response> tags."
    )


def template_messages(
    messages: list[dict[str, Any]], spec: ToolSpec | None, template_source: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to render with the chat template: as they are for a template that knows tools
    (arguments as objects, as Hugging Face templates expect), else in the Hermes format with the tools
    described in the system message and results in user turns."""
    native = "tools" in template_source or "tool_calls" in template_source
    if native:
        out = []
        for m in messages:
            if m.get("tool_calls"):
                m = {**m, "tool_calls": [_with_object_arguments(c) for c in m["tool_calls"]]}
            out.append(m)
        return out, spec.tools if spec else None
    out = []
    for m in messages:
        if m["role"] == "tool":
            response = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # results of parallel calls: one user turn
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + response}
            else:
                out.append({"role": "user", "content": response, "tool_results": True})
        elif m.get("tool_calls"):
            calls = [_call_text(c) for c in m["tool_calls"]]
            out.append({"role": m["role"], "content": "\n".join(filter(None, [m.get("content") or "", *calls]))})
        else:
            out.append(m)
    out = [{k: v for k, v in m.items() if k != "tool_results"} for m in out]
    if spec is not None:
        prompt = system_prompt(spec.tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _function_of(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise MlccError("messages: an assistant's tool_calls need function.name")
    return function


def _arguments(function: dict[str, Any]) -> Any:
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            raise MlccError(f"messages: the arguments of a call to {function['name']!r} are not JSON") from None
    return arguments


def _with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = _function_of(call)
    return {**call, "function": {**function, "arguments": _arguments(function)}}


def _call_text(call: dict[str, Any]) -> str:
    function = _function_of(call)
    body = json.dumps({"name": function["name"], "arguments": _arguments(function)}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


class ToolCallParser:
    """Splits a reply, as it streams, into text and tool calls. `feed` and `finish` return (text to send now,
    calls completed): text that may still turn out to be a call is held back until that is decided."""

    def __init__(self, spec: ToolSpec):
        self.names = set(spec.names)
        self.forced = spec.forced
        self.pending = ""  # held text: a call being written, or what may be the start of one
        self.calls: list[ToolCall] = []
        self.sent_text = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.pending += text
        released, found = "", []
        while True:
            start = self.pending.find(OPEN)
            if start < 0:
                break
            end = _call_end(self.pending, start)
            if end < 0:
                released += self._release(self.pending[:start])
                self.pending = self.pending[start:]
                return released, found
            block = self.pending[start : end + len(CLOSE)]
            released += self._release(self.pending[:start])
            self.pending = self.pending[end + len(CLOSE) :]
            calls = self._parse(block[len(OPEN) : -len(CLOSE)])
            if calls is None or len(calls) != 1:
                released += block
            else:
                found += calls
                self.calls += calls
        if not self.forced and not self._may_be_bare_call() and (self.pending.strip() or not self.calls):
            keep = _partial_tag(self.pending)
            released += self.pending[: len(self.pending) - keep]
            self.pending = self.pending[len(self.pending) - keep :]
        return self._sent(released), found

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the reply: an unclosed call or a bare JSON call still counts, when well formed."""
        rest, self.pending = self.pending, ""
        body = rest.strip()
        calls = self._parse(body.removeprefix(OPEN).removesuffix(CLOSE))
        if calls:
            self.calls += calls
            return "", calls
        if self.forced:  # a call cut short (max_tokens): never text
            return "", []
        return self._sent(self._release(rest)), []

    def _release(self, text: str) -> str:
        """Text outside calls; whitespace between calls is dropped."""
        return "" if not text.strip() and self.calls else text

    def _sent(self, text: str) -> str:
        self.sent_text = self.sent_text or bool(text.strip())
        return text

    def _may_be_bare_call(self) -> bool:
        """Whether the held text may still be a bare JSON call: so far the reply is nothing but it."""
        head = self.pending.lstrip()
        return not self.sent_text and not self.calls and (not head or head[0] in "{[")

    def _parse(self, body: str) -> list[ToolCall] | None:
        """The calls in a call's JSON (an object, or a list of them), or None unless all are well formed."""
        try:
            value = json.loads(body)
        except ValueError:
            return None
        items = value if isinstance(value, list) else [value]
        calls = []
        for item in items:
            if not isinstance(item, dict) or item.get("name") not in self.names:
                return None
            arguments = item.get("arguments", item.get("parameters", {}))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    return None
            if not isinstance(arguments, dict):
                return None
            calls.append(ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False)))
        return calls or None


def _call_end(text: str, start: int) -> int:
    """Where the call opened at `start` closes: its first closing tag outside JSON strings (a string may hold
    the tag, and the forcing grammar allows that), or -1 while there is none yet."""
    for match in _STRING_OR_CLOSE.finditer(text, start + len(OPEN)):
        if match.group(1):  # a string still being written, or never closed: any tag after it is inside it
            return -1
        if match.group() == CLOSE:
            return match.start()
    return -1


def _partial_tag(text: str) -> int:
    """Length of the longest tail of `text` that is a beginning of the opening tag."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
