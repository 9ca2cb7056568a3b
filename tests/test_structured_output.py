"""Structured output and tool calling (issue 22) on the tiny random models: whatever the weights say, the
constrained outputs must parse and validate, free requests in the same batch must keep their solo text, and
bad constraints must be one-line 400s or CLI errors. The real-model checks are in tests/test_real_models.py."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import jsonschema
import numpy as np
import openai
import pytest
import uvicorn
from test_cli import assert_one_line_error, mlcc
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from artifacts.errors import MlccError
from runtime import SamplingParams, ServingEngine
from runtime.constraints import ConstraintCompiler, apply_mask, closed, compute_mask, constraint_of
from runtime.server import create_app
from runtime.tools import ToolCallParser, ToolSpec, template_messages

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
        "size": {"enum": ["small", "large"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "inner": {
            "type": "object",
            "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
            "required": ["tags"],
        },
    },
    "required": ["name", "ok", "size", "count", "inner"],
}
REGEX = r"(cat|dog)-[0-9]{2,3}"
LARK = 'start: "x=" NUM ("," NUM)*\nNUM: /[0-9]/'
GBNF = 'root ::= "say " word " " word\nword ::= [a-z] [a-z]?'
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}},
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC"]}}}},
    },
]


def sampled(seed: int, **constraint) -> SamplingParams:
    return SamplingParams(max_tokens=120, temperature=1.0, seed=seed, **constraint)


# ---- the engine -------------------------------------------------------------------------------------------
def test_json_schema_outputs_validate(engine):
    e = engine("llama-q4")
    results = e.generate(["Hello", "The quick brown fox"], sampled(1, json_schema=SCHEMA, n=3))
    for r in results:
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), SCHEMA)
    assert len({r.text for r in results}) > 1  # sampled, not one forced text


def test_regex_and_grammars_fullmatch(engine):
    e = engine("llama-q4")
    for seed in range(3):
        assert re.fullmatch(REGEX, e.generate("Once upon", sampled(seed, regex=REGEX))[0].text)
        assert re.fullmatch(r"x=[0-9](,[0-9])*", e.generate("Once upon", sampled(seed, grammar=LARK))[0].text)
        assert re.fullmatch(r"say [a-z]{1,2} [a-z]{1,2}", e.generate("Once upon", sampled(seed, grammar=GBNF))[0].text)


def test_any_json_object(engine):
    r = engine("llama-q4").generate(
        "Hello", SamplingParams(max_tokens=300, temperature=0, json_schema={"type": "object"})
    )
    if r[0].finish_reason == "stop":  # a random model may write one long string until max_tokens
        assert isinstance(json.loads(r[0].text), dict)
    assert r[0].text.startswith("{")


def test_free_requests_keep_their_solo_text_in_a_mixed_batch(engine):
    e = engine("llama-q4")
    prompts = ["Hello! How are you", "def main():", "The capital of France"]
    free = SamplingParams(max_tokens=24, temperature=0.8, seed=7)
    solo = [e.generate(p, free)[0].text for p in prompts]
    constrained = [sampled(3, json_schema=SCHEMA), sampled(4, regex=REGEX)]
    requests = []
    for i, p in enumerate(prompts):
        ids = e.tokenizer.encode(p)
        requests += e.make_requests(ids, free)
        if i < len(constrained):
            requests += e.make_requests(ids, constrained[i])
    e.enqueue(requests)
    while any(r.finish_reason is None for r in requests):
        e.step()
    free_texts = [r.text for r in requests if r.matcher is None]
    assert free_texts == solo
    jsonschema.validate(json.loads(requests[1].text), SCHEMA)
    assert re.fullmatch(REGEX, requests[3].text)


@pytest.mark.parametrize(
    "constraint, fragment",
    [
        (dict(json_schema={"type": "nope"}), "invalid JSON schema"),
        (dict(json_schema="{not json"), "invalid JSON schema: not JSON"),
        (dict(regex="a(b"), "invalid regex"),
        (dict(grammar="start: undefined_rule"), "invalid grammar"),
        (dict(grammar="root ::= ["), "invalid grammar"),
        (dict(grammar="start: start"), "invalid grammar"),  # valid syntax, but no output can satisfy it
        (dict(json_schema=False), "invalid JSON schema"),
        (dict(regex="a", grammar=LARK), "at most one"),
    ],
)
def test_invalid_constraints_are_one_line_errors(engine, constraint, fragment):
    with pytest.raises(MlccError, match=fragment) as info:
        engine("llama-q4").generate("Hello", SamplingParams(max_tokens=4, **constraint))
    assert "\n" not in str(info.value)


def test_closed_schema_keeps_open_ones_open():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}}}, "patternProperties": {}}
    assert "additionalProperties" not in closed(schema)
    assert closed(schema)["properties"]["a"]["additionalProperties"] is False
    assert closed({"type": "object"}) == {"type": "object"}


# ---- vocabularies: byte-level BPE (the tiny models') and SentencePiece ------------------------------------------
class FakeTokenizer:
    def __init__(self, tok: Tokenizer):
        self.tok, self.eos_ids = tok, {1}


def sentencepiece_tokenizer() -> Tokenizer:
    """Llama's kind of tokenizer.json: "▁" for spaces, <0xNN> byte-fallback tokens, no pre-tokenizer; "ü" only
    as bytes."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    merges = [("a", "t"), ("▁", "c"), ("▁c", "at"), ("▁", "d"), ("o", "g"), ("▁d", "og"), ("▁", "7"), ("é", "!")]
    for piece in ["▁", "c", "a", "t", "d", "o", "g", *"0123456789", "!", "é", *("".join(m) for m in merges)]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken("<unk>", special=True), AddedToken("</s>", special=True)])
    assert tok.encode("cat 7 ü!").tokens == ["▁cat", "▁7", "▁", "<0xC3>", "<0xBC>", "!"]
    return tok


@pytest.mark.parametrize("kind", ["bytelevel", "sentencepiece"])
def test_masks_follow_the_real_vocabulary(kind, hf_folder):
    tok = Tokenizer.from_file(str(hf_folder("llama-q4") / "tokenizer.json"))
    if kind == "sentencepiece":
        tok = sentencepiece_tokenizer()
    vocab = tok.get_vocab_size() + 5  # padded logits, as some models have
    compiler = ConstraintCompiler(FakeTokenizer(tok), vocab)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    pattern = r"(cat|dog) [0-9]{1,3} (é|ü)!"
    texts = set()
    for _ in range(8):
        matcher = compiler.matcher(constraint_of(None, pattern, None))  # type: ignore[arg-type]
        ids = []
        while not matcher.is_stopped():
            logits = apply_mask(
                rng.standard_normal(vocab).astype(np.float32), compute_mask(matcher, compiler.mask_words)
            )
            token = int(np.argmax(logits))
            assert np.isfinite(logits[token]) and matcher.consume_token(token)
            if token != 1:
                ids.append(token)
        assert re.fullmatch(pattern, tok.decode(ids)), tok.decode(ids)
        texts.add(tok.decode(ids))
    assert any("ü" in t for t in texts) and len(texts) > 4


# ---- tool calls: the parser and the template -------------------------------------------------------------------
def parse_stream(spec: ToolSpec, text: str, step: int = 3) -> tuple[str, list[tuple[str, dict]]]:
    parser, out, calls = ToolCallParser(spec), [], []
    for i in range(0, len(text), step):
        piece, found = parser.feed(text[i : i + step])
        out.append(piece)
        calls += found
    piece, found = parser.finish()
    return "".join(out) + piece, [(c.name, json.loads(c.arguments)) for c in calls + found]


def test_tool_call_parser():
    auto = ToolSpec.parse(TOOLS, "auto", True)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>'
    assert parse_stream(auto, "Let me check. " + call) == (
        "Let me check. ",
        [("get_weather", {"city": "Oslo", "unit": "C"})],
    )
    assert parse_stream(auto, call + "\n" + call.replace("Oslo", "Rome"))[1][1] == (
        "get_weather",
        {"city": "Rome", "unit": "C"},
    )
    assert parse_stream(auto, '{"name": "get_time", "arguments": {}}') == ("", [("get_time", {})])
    assert parse_stream(auto, "a < b and <tool") == ("a < b and <tool", [])
    unknown = '<tool_call>{"name": "rm", "arguments": {}}</tool_call>'
    assert parse_stream(auto, unknown) == (unknown, [])
    assert parse_stream(ToolSpec.parse(TOOLS, "required", True), '<tool_call>\n{"name": "get_ti') == ("", [])


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_a_closing_tag_inside_a_string_does_not_end_the_call(choice, hf_folder):
    """A JSON string may hold the tag `</tool_call>`, and the forcing grammar allows it (SmolLM2, sampled, once
    wrote `"city": "]}</tool_call>…"`): a call ends at the first tag outside its JSON's strings."""
    note = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    tools = [{"type": "function", "function": {"name": "note", "parameters": note}}]
    call = '<tool_call>\n{"name": "note", "arguments": {"text": "]}</tool_call>"}}\n</tool_call>'
    tok = Tokenizer.from_file(str(hf_folder("llama-q4") / "tokenizer.json"))
    compiler = ConstraintCompiler(FakeTokenizer(tok), tok.get_vocab_size())  # type: ignore[arg-type]
    forced = constraint_of(None, None, ToolSpec.parse(tools, "required", True).grammar())
    matcher = compiler.matcher(forced)  # type: ignore[arg-type]
    ids = tok.encode(call, add_special_tokens=False).ids
    assert matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()
    spec = ToolSpec.parse(tools, choice, True)
    escaped = call.replace('"]}', '"\\"]}')  # an escaped quote does not end the string
    for text, value in [(call, "]}</tool_call>"), (escaped, '"]}</tool_call>')]:
        for step in (1, 3, len(text)):
            assert parse_stream(spec, text, step) == ("", [("note", {"text": value})])
    if choice == "auto":  # a tag after an unterminated string: not a call, and the text comes back whole
        broken = '<tool_call>\n{"name": "note", "arguments": {"text": "a}}\n</tool_call> ok'
        assert parse_stream(spec, broken) == (broken, [])


@pytest.mark.parametrize(
    "tools, choice, fragment",
    [
        (None, "required", "tool_choice needs tools"),
        (TOOLS, "sometimes", "tool_choice must be"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
        ([{"type": "function", "function": {"name": "bad name"}}], "auto", "function name"),
    ],
)
def test_bad_tool_requests(tools, choice, fragment):
    with pytest.raises(MlccError, match=fragment):
        ToolSpec.parse(tools, choice, True)


def test_tool_messages_go_back_into_the_template():
    spec = ToolSpec.parse(TOOLS, "auto", True)
    arguments = '{"city": "Oslo", "unit": "C"}'
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "12 C, rain"},
    ]
    plain, tools = template_messages(messages, spec, "{{ messages }}")
    assert tools is None and plain[0]["role"] == "system" and "get_weather" in plain[0]["content"]
    assert '"arguments": {"city": "Oslo", "unit": "C"}' in plain[2]["content"]
    assert plain[3] == {"role": "user", "content": "<tool_response>\n12 C, rain\n</tool_response>"}
    native, tools = template_messages(messages, spec, "{% for t in tools %}{% endfor %}")
    assert tools == TOOLS and native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo", "unit": "C"}


# ---- the server ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(artifact):
    serving = ServingEngine(artifact("llama-q4-long"), max_batch_size=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = uvicorn.Server(uvicorn.Config(create_app(serving, "tiny"), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.02)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    http.should_exit = True
    thread.join()
    serving.close()


def test_response_format_json_schema(client):
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hello"}],
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}},
        max_tokens=120,
        seed=5,
        n=2,
    )
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    completion = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=40, extra_body={"guided_regex": REGEX}
    )
    assert re.fullmatch(REGEX, completion.choices[0].text)


@pytest.mark.parametrize(
    "extra, param",
    [
        (
            dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}),
            "response_format",
        ),
        (dict(extra_body={"guided_regex": "(("}), "guided_regex"),
        (dict(extra_body={"guided_grammar": "start: nothing_here"}), "guided_grammar"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
    ],
)
def test_bad_constraints_are_400s_and_the_server_goes_on(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, **extra
        )
    error = info.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")


def arguments_valid(call) -> dict:
    tool = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, closed(tool["function"]["parameters"]))
    return arguments


def test_forced_tool_calls(client):
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny", messages=messages, tools=TOOLS, tool_choice=named, max_tokens=300, seed=seed
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
        arguments_valid(choice.message.tool_calls[0])
    reply = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=300
    )
    assert len(reply.choices[0].message.tool_calls) == 1
    arguments_valid(reply.choices[0].message.tool_calls[0])


def test_streamed_tool_calls_as_openai_streams_them(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=300,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant"
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert calls[0].id and calls[0].type == "function" and calls[0].function.name == "get_weather"
    assert all(c.index == 0 for c in calls) and not any(c.id for c in calls[1:])
    arguments = "".join(c.function.arguments or "" for c in calls)
    jsonschema.validate(json.loads(arguments), closed(TOOLS[0]["function"]["parameters"]))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(d.content for d in deltas)


def test_tool_results_reach_the_model(client):
    """A conversation with a call and its result renders (through the tiny model's own template) and runs."""
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "12 C"},
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=8, temperature=0)
    assert reply.usage.prompt_tokens > 50  # the tools' description and the call went in
    with pytest.raises(openai.BadRequestError):
        broken = [
            *messages[:1],
            {
                **messages[1],
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "x", "arguments": "{"}}],
            },
        ]
        client.chat.completions.create(model="tiny", messages=broken, max_tokens=4)


# ---- the CLI ---------------------------------------------------------------------------------------------------
def test_cli_constraints(artifact, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    tiny = str(artifact("llama-q4"))
    out = mlcc("run", tiny, "--raw", "--prompt", "Hello", "--json-schema", str(schema), "--max-tokens", "120")
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), SCHEMA)
    bad = tmp_path / "bad.gbnf"
    bad.write_text("root ::= [")
    assert_one_line_error(mlcc("run", tiny, "--prompt", "x", "--grammar", str(bad)), "invalid grammar")
    assert_one_line_error(
        mlcc("run", "--prompt", "x", "--json-schema", str(tmp_path / "missing.json")), "--json-schema"
    )
