"""Structured output: JSON schema, regex and grammar constraints on sampling, with llguidance's token masks.

llguidance (see the README for why it over xgrammar) compiles a constraint into a matcher that follows the
tokens a request generates and says which tokens may come next, as a bitmask over the model's vocabulary. The
vocabulary is read from the artifact's tokenizer.json, so byte-level BPE and SentencePiece (byte fallback,
"▁" spaces) tokens are matched by the bytes they really decode to. Masks are computed on the host, per
request; tokens outside the mask get -inf logits before sampling.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
from llguidance import LLExecutor, LLMatcher, LLTokenizer
from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par

from artifacts.errors import MlccError
from runtime.tokenizer import Tokenizer

# JSON as people write it on one line: `{"a": 1, "b": [2, 3]}`. Free whitespace lets a small model wander
# off into newlines until max_tokens, leaving invalid JSON. A schema's "x-guidance" key overrides this.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(MlccError):
    """The request's schema, regex or grammar is invalid (HTTP 400 naming the field it came in)."""


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match: kind "json_schema" (source: the schema as JSON text), "regex"
    (the whole output must match), or "grammar" (Lark/EBNF as llguidance reads it, or llama.cpp's GBNF)."""

    kind: str
    source: str

    def grammar(self) -> str:
        """llguidance's grammar text; raises MlccError for what cannot even be read."""
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.source)
            except ValueError as e:
                raise ConstraintError(f"invalid JSON schema: not JSON: {e}") from None
            if schema is True:  # any JSON value
                schema = {}
            if not isinstance(schema, dict):
                raise ConstraintError("invalid JSON schema: it must be a JSON object (or true)")
            try:
                return LLMatcher.grammar_from_json_schema(closed(schema), defaults=JSON_DEFAULTS)  # type: ignore
            except ValueError as e:
                raise ConstraintError(f"invalid JSON schema: {e}") from None
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        try:
            return llguidance.grammar_from("grammar", self.source)  # Lark as it is; GBNF converted to Lark
        except ValueError as e:
            raise ConstraintError(f"invalid grammar: {e}") from None


_SUBSCHEMA = ("items", "additionalProperties", "additionalItems", "not", "if", "then", "else", "contains")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")  # not allOf: its parts' properties add up
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def closed(schema: Any) -> Any:
    """The schema with objects that list their properties closed to others (additionalProperties: false)
    where it leaves that open, as OpenAI's strict mode requires and xgrammar assumes: outputs stay valid
    against the original, and a small model cannot wander off into invented keys until max_tokens."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(s) for name, s in out[key].items()}
    if isinstance(out.get("properties"), dict) and not {"additionalProperties", "patternProperties"} & out.keys():
        out["additionalProperties"] = False
    return out


def constraint_of(
    json_schema: dict[str, Any] | str | None, regex: str | None, grammar: str | None
) -> Constraint | None:
    """The one constraint that SamplingParams' fields ask for, or None."""
    given = [(k, v) for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise MlccError(f"give at most one of json_schema, regex and grammar (got {', '.join(k for k, _ in given)})")
    if not given:
        return None
    kind, value = given[0]
    if kind == "json_schema" and not isinstance(value, str):
        value = json.dumps(value)
    if not isinstance(value, str):
        raise MlccError(f"{kind} must be a string")
    return Constraint(kind, value)


def check_constraint(constraint: Constraint | None) -> None:
    """Raise ConstraintError for a constraint that is invalid whatever the vocabulary (no tokenizer needed)."""
    if constraint is None:
        return
    what = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar"}[constraint.kind]
    error = LLMatcher.validate_grammar(constraint.grammar())
    if error:
        raise ConstraintError(f"invalid {what}: {_first_line(error)}")


def _first_line(message: str) -> str:
    """llguidance's multi-line message in one line: its first line, and the cause where it comes later."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return "not accepted"
    cause = next((line.removeprefix("error:").strip() for line in lines[1:] if line.startswith("error:")), "")
    return f"{lines[0]} {cause}" if cause else lines[0]


class ConstraintCompiler:
    """Turns constraints into matchers over one model's vocabulary. Thread-safe; the tokenizer's token table
    (about a second for a 50k vocabulary) is built on first use."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        # The model's logits may have more entries than the tokenizer has tokens (padded embeddings), or fewer.
        self.n_vocab = max(vocab_size, tokenizer.tok.get_vocab_size(with_added_tokens=True))
        self.mask_words = (self.n_vocab + 31) // 32
        self._lock = threading.Lock()
        self._lltokenizer: LLTokenizer | None = None

    def lltokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._lltokenizer is None:
                eos = sorted(self.tokenizer.eos_ids) or None
                try:
                    self._lltokenizer = LLTokenizer(self.tokenizer.tok.to_str(), n_vocab=self.n_vocab, eos_token=eos)
                except Exception as e:  # llguidance reports an unsupported tokenizer as a plain Exception
                    raise MlccError(f"structured output does not support this tokenizer: {e}") from None
            return self._lltokenizer

    def warm_up(self) -> None:
        """Build the token table in a background thread (seconds for a 262k vocabulary), so that the first
        constrained request does not wait for it; a tokenizer llguidance cannot read fails its requests later."""

        def build() -> None:
            try:
                self.lltokenizer()
            except MlccError:
                pass

        threading.Thread(target=build, name="mlcc-constraints-vocab", daemon=True).start()

    def matcher(self, constraint: Constraint) -> LLMatcher:
        """A fresh matcher at the start of the output; an invalid constraint raises MlccError (one line)."""
        what = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar"}[constraint.kind]
        grammar = constraint.grammar()
        error = LLMatcher.validate_grammar(grammar, self.lltokenizer())
        if error:
            raise ConstraintError(f"invalid {what}: {_first_line(error)}")
        matcher = LLMatcher(self.lltokenizer(), grammar, log_level=0)
        first = np.zeros((1, self.mask_words), dtype=np.int32)
        fill_next_token_bitmask(matcher, first)  # a constraint that allows nothing is invalid too
        if matcher.is_error():
            raise ConstraintError(f"invalid {what}: {_first_line(matcher.get_error())}")
        if not first.any():
            raise ConstraintError(f"invalid {what}: it allows no output")
        return matcher


def compute_mask(matcher: LLMatcher, words: int) -> np.ndarray:
    """The allowed next tokens of one matcher, as int32 words of 32 token bits (little-endian)."""
    mask = np.zeros((1, words), dtype=np.int32)
    fill_next_token_bitmask(matcher, mask)
    check(matcher)
    return mask[0]


def check_mask(mask: np.ndarray) -> None:
    if not mask.any():  # e.g. a grammar whose language is empty
        raise MlccError("the constraint allows no next token")


def compute_masks(executor: LLExecutor, matchers: list[LLMatcher], words: int) -> np.ndarray:
    """Masks [len(matchers), words] of several matchers, computed in parallel (llguidance drops the GIL)."""
    masks = np.zeros((len(matchers), words), dtype=np.int32)
    fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], masks)
    return masks


def check(matcher: LLMatcher) -> None:
    if matcher.is_error():
        raise MlccError(f"the constraint failed: {_first_line(matcher.get_error())}")


def apply_mask(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of a [vocab] logits row with every token outside the mask at -inf."""
    allowed = np.unpackbits(mask.view(np.uint8), bitorder="little", count=logits.size).view(bool)
    return np.where(allowed, logits.astype(np.float32, copy=False), np.float32(-np.inf))
