"""Tokenizer, chat template and incremental detokenization, from the artifact's tokenizer files."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from artifacts.errors import MlccError


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """Renders a Hugging Face chat template the way transformers does (same jinja2 settings and helpers)."""

    def __init__(self, source: str, bos_token: str | None, eos_token: str | None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.source = source
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """`tools`: OpenAI's tool entries, for templates that render them (Hugging Face's convention)."""
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=tools, **self.special
            )
        except TemplateError as e:
            raise MlccError(f"chat template error: {e}") from None


class Tokenizer:
    def __init__(self, folder: Path, info: dict[str, Any], chat_template: str | None):
        try:
            self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a plain Exception on bad JSON
            raise MlccError(f"cannot load tokenizer.json: {e}") from None
        self.eos_ids = set(info.get("eos_token_ids") or [])
        eos = info.get("eos_token")
        if eos is not None and self.tok.token_to_id(eos) is not None:
            self.eos_ids.add(self.tok.token_to_id(eos))
        self.chat_template = ChatTemplate(chat_template, info.get("bos_token"), eos) if chat_template else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # e.g. a lone surrogate sent as "\ud800" in JSON
            raise MlccError(f"the text is not valid Unicode (character {e.start}: {e.reason})") from None
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        if self.chat_template is None:
            raise MlccError("this model has no chat template; use a plain prompt (--raw)")
        # The template already writes the special tokens (BOS, role markers), as in transformers.
        return self.encode(self.chat_template.render(messages, tools=tools), add_special_tokens=False)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas.

    Decoding the new ids together with a few ids before them keeps the spacing that some tokenizers
    (SentencePiece) only produce in context, and a trailing U+FFFD means a multi-byte character is still
    incomplete, so it waits for more tokens. The window slides once a token's text is out, so each token costs
    the decoding of a few ids, not of all the ids generated so far.
    """

    CONTEXT = 4
    WINDOW = 4 * CONTEXT  # the most ids decoded at once, between slides

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT :])
        self.prefix_text = tokenizer.decode(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd"):
            return ""
        text = full[len(self.prefix_text) :] if full.startswith(self.prefix_text) else full
        delta, self.text = text[len(self.text) :], text
        if len(self.ids) >= self.WINDOW:  # all out: the last few ids become the context of the next ones
            self.ids = self.ids[-self.CONTEXT :]
            self.prefix_text = self.tokenizer.decode(self.ids)
            self.text = ""
        return delta
