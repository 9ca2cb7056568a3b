"""The server as an attacker or a careless client meets it: no request harms another, errors are 4xx in
OpenAI's shape and leave the connection usable, limits hold, shutdown is prompt."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import Engine, SamplingParams, ServingEngine
from runtime.sampler import LOGPROB_FLOOR, sample, token_logprob
from runtime.server import MAX_BODY_BYTES, MAX_SEQUENCES_PER_REQUEST, create_app

API_KEY = "test-key"
MODEL = "tiny-llama"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A ServingEngine behind uvicorn in a thread, as `mlcc serve` runs it."""

    def __init__(self, serving: ServingEngine):
        self.serving = serving
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        config = uvicorn.Config(create_app(serving, MODEL, api_key=API_KEY), port=port, log_level="warning")
        self.http = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.http.run, daemon=True)
        self.thread.start()
        while not self.http.started:
            time.sleep(0.02)

    def close(self) -> None:
        self.http.should_exit = True
        self.thread.join()
        self.serving.close()


@pytest.fixture(scope="module")
def live(artifact):
    server = LiveServer(ServingEngine(artifact("llama-q4"), max_batch_size=4, max_queued=24))
    yield server
    server.close()


@pytest.fixture
def http(live):
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=60) as client:
        yield client


def chat(content: str = "Hello", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **fields}


def wait_idle(serving: ServingEngine, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while serving.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert serving.in_flight == 0


# ---- 1. one client's sampling cannot harm another ------------------------------------------------------
def test_a_denormal_temperature_is_greedy_and_harms_no_one(http):
    greedy = http.post("/v1/chat/completions", json=chat(temperature=0)).json()["choices"][0]["message"]["content"]
    with ThreadPoolExecutor(4) as pool:
        others = [
            pool.submit(http.post, "/v1/chat/completions", json=chat(f"story {i}", max_tokens=24)) for i in range(3)
        ]
        tiny = pool.submit(http.post, "/v1/chat/completions", json=chat(temperature=1e-320))
        assert tiny.result().status_code == 200
        assert tiny.result().json()["choices"][0]["message"]["content"] == greedy
        assert all(f.result().status_code == 200 for f in others)


@pytest.mark.parametrize(
    "fields",
    [
        {"repetition_penalty": 1e-320},
        {"repetition_penalty": 1e300},
        {"temperature": -1},
        {"temperature": 1e300},
        {"top_p": 0},
        {"logit_bias": {"5": 1e9}},
        {"max_tokens": 0},
        {"max_tokens": -3},
    ],
)
def test_bad_sampling_fields_are_400s_naming_the_field(http, fields):
    completion = {"model": MODEL, "prompt": "Hi", **fields}
    for route, body in [("/v1/chat/completions", chat(**fields)), ("/v1/completions", completion)]:
        r = http.post(route, json=body)
        assert r.status_code == 400, (route, r.text)
        assert r.json()["error"]["param"] == next(iter(fields))


def test_nan_and_infinity_in_the_body_are_400s(http):
    for literal in ["NaN", "Infinity", "-Infinity"]:
        body = json.dumps(chat()).replace('"max_tokens"', f'"temperature": {literal}, "max_tokens"')
        r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "temperature"


def test_a_failure_inside_one_request_ends_that_request_alone(engine):
    eng: Engine = engine("llama-q4")
    ids = eng.tokenizer.encode("Once upon a time")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    healthy, doomed = eng.make_requests(ids, params) + eng.make_requests(ids, SamplingParams(max_tokens=6))
    doomed.params.temperature = math.nan  # past validation: sampling itself fails
    eng.enqueue([healthy, doomed])
    while healthy.finish_reason is None or doomed.finish_reason is None:
        eng.step()
    assert doomed.finish_reason == "error" and "probabilities" in doomed.error.lower()
    assert healthy.result().token_ids == eng.generate_ids([ids], params)[0].token_ids


def test_logprobs_are_finite_json_numbers():
    lp = token_logprob(np.array([0.0, -np.inf, 1.0], dtype=np.float32), 1, 3)
    assert lp.logprob == LOGPROB_FLOOR and all(math.isfinite(x) for _, x in lp.top)
    with pytest.raises(Exception, match="non-finite"):
        sample(np.array([np.nan, 1.0], dtype=np.float32), SamplingParams(), np.random.default_rng(0))


def test_streamed_logprobs_with_a_strong_bias_are_valid_json(http):
    body = chat(stream=True, logprobs=True, top_logprobs=5, logit_bias={str(i): -100 for i in range(40)})
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                json.loads(line[6:], parse_constant=lambda c: pytest.fail(f"{c} in the stream"))


# ---- 2. limits on what one request may queue; disconnects; shutdown ----------------------------------------
def test_too_many_completions_in_one_request_is_a_400(http):
    body = {"model": MODEL, "prompt": ["Once upon a time"] * 100, "n": 128, "max_tokens": 50}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert MAX_SEQUENCES_PER_REQUEST < 100 * 128


def test_a_full_server_answers_429_and_recovers(live, http):
    body = {"model": MODEL, "prompt": ["Once upon a time"] * 12, "n": 2, "max_tokens": 64, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(http.post, "/v1/completions", json=body)  # 24 sequences: the server is full
        deadline = time.monotonic() + 30
        while live.serving.in_flight < 24 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = http.post("/v1/chat/completions", json=chat())
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert first.result().status_code == 200
    wait_idle(live.serving)
    assert http.post("/v1/chat/completions", json=chat()).status_code == 200


def test_a_non_streaming_client_that_leaves_aborts_its_work(live):
    aborted = live.serving.stats["aborted_requests_total"]
    body = {"model": MODEL, "prompt": "Once", "n": 4, "max_tokens": 2000, "ignore_eos": True}
    live.serving._post(lambda: time.sleep(1.5))  # hold the engine so that the client leaves first
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/completions", json=body, headers=AUTH, timeout=0.5)
    wait_idle(live.serving)
    assert live.serving.stats["aborted_requests_total"] - aborted == 4


def test_sigterm_aborts_work_and_exits_promptly(artifact):
    port = free_port()
    cmd = [sys.executable, "-m", "mlcc_cli", "serve", str(artifact("llama-q4")), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "x", "prompt": ["Once"] * 8, "max_tokens": 2000, "ignore_eos": True}
        body["model"] = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60)
            while not httpx.get(url + "/metrics").text.count("mlcc_requests_running 8"):
                time.sleep(0.05)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
            assert time.monotonic() - start < 8
            reply = pending.result()
            assert reply.status_code == 200
            assert {c["finish_reason"] for c in reply.json()["choices"]} == {"abort"}
    finally:
        proc.kill()
        proc.wait()


# ---- 4. bodies and tokenizing -----------------------------------------------------------------------------
def test_an_oversized_body_is_a_413(http):
    r = http.post("/v1/chat/completions", json=chat("x" * (MAX_BODY_BYTES + 10)))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


# ---- 5. client mistakes are 4xx; no error closes the connection -------------------------------------------
def test_negative_seed_and_lone_surrogates(http):
    assert http.post("/v1/chat/completions", json=chat(seed=-1)).status_code == 200
    lone = '"caf\\ud800e"'  # JSON's escape of a lone surrogate, which Python's json accepts
    for route, body in [
        ("/v1/chat/completions", f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": {lone}}}]}}'),
        ("/v1/completions", f'{{"model": "{MODEL}", "prompt": {lone}}}'),
    ]:
        r = http.post(route, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] in ("messages", "prompt")


def test_an_internal_error_keeps_the_connection_usable(live, http, monkeypatch):
    calls = Counter()
    real = live.serving.engine.tokenizer.encode_chat

    def flaky(messages):
        calls["n"] += 1
        if messages[0]["content"] == "boom":
            raise RuntimeError("kaput")
        return real(messages)

    monkeypatch.setattr(live.serving.engine.tokenizer, "encode_chat", flaky)
    for _ in range(10):
        bad = http.post("/v1/chat/completions", json=chat("boom"))
        assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
        assert http.post("/v1/chat/completions", json=chat(max_tokens=1)).status_code == 200
    assert calls["n"] == 20


# ---- 6. the API key protects everything but /health --------------------------------------------------------
def test_the_api_key_guards_metrics_and_the_schema(live):
    for path in ["/metrics", "/openapi.json", "/v1/models"]:
        assert httpx.get(live.url + path).status_code == 401
        assert httpx.get(live.url + path, headers=AUTH).status_code == 200
    assert httpx.get(live.url + "/health").status_code == 200


# ---- 10. a model that cannot run is not healthy ---------------------------------------------------------
def test_a_failing_model_makes_health_503(artifact):
    server = LiveServer(ServingEngine(artifact("llama-q4")))
    try:

        def broken(*_):
            raise RuntimeError("weights do not fit the config")

        server.serving.engine._prefill = broken
        r = httpx.post(server.url + "/v1/chat/completions", json=chat(), headers=AUTH)
        assert r.status_code == 500
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and "weights do not fit" in health.json()["error"]["message"]
        with pytest.raises(Exception, match="the model cannot run"):
            server.serving.engine.self_check()
    finally:
        server.close()


# ---- fuzz: generated requests never get a 5xx and the server stays alive ------------------------------------
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(-5, 60000), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(-200, 200), max_size=3),
)
EDGE_FLOATS = st.one_of(
    st.floats(-3, 3),
    st.sampled_from([0.0, 1e-320, 1e-45, 1e-5, 1.0, 2.0, 1e300, -1e-320]),
    st.floats(allow_nan=True, allow_infinity=True),
)
TEXTS = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(["", "\ud800", "<|end|>", "\x00"])
TOKEN_IDS = st.lists(st.integers(-3, 400), max_size=6)
# Mostly well-typed values (edges included), so that requests get past the schema into the engine.
FIELDS = {
    "temperature": EDGE_FLOATS,
    "top_p": EDGE_FLOATS,
    "min_p": EDGE_FLOATS,
    "presence_penalty": EDGE_FLOATS,
    "frequency_penalty": EDGE_FLOATS,
    "repetition_penalty": EDGE_FLOATS,
    "top_k": st.integers(-2, 500),
    "n": st.integers(-1, 4),
    "seed": st.integers(-(2**64), 2**65),
    "stop": st.none() | TEXTS | st.lists(TEXTS, max_size=3),
    "logit_bias": st.dictionaries(st.integers(-2, 400).map(str), EDGE_FLOATS, max_size=3),
    "logprobs": st.booleans() | st.integers(-1, 25),
    "top_logprobs": st.integers(-1, 25),
    "stream": st.booleans(),
    "stop_token_ids": TOKEN_IDS,
    "ignore_eos": st.booleans(),
    "echo": st.booleans(),
    "model": st.sampled_from([MODEL, "llama", "other", ""]),
}
CHAT_FIELDS = {
    "messages": st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]), "content": TEXTS}),
        max_size=3,
    ),
}
COMPLETION_FIELDS = {"prompt": TEXTS | TOKEN_IDS | st.lists(TEXTS, max_size=3) | st.lists(TOKEN_IDS, max_size=2)}


@st.composite
def requests(draw):
    chat_route = draw(st.booleans())
    route = "/v1/chat/completions" if chat_route else "/v1/completions"
    body = chat() if chat_route else {"model": MODEL, "prompt": "Hi", "max_tokens": 8}
    fields = {**FIELDS, **(CHAT_FIELDS if chat_route else COMPLETION_FIELDS)}
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=5, unique=True)):
        body[name] = draw(fields[name] | ANY_VALUE) if draw(st.integers(0, 9)) == 0 else draw(fields[name])
    body["max_tokens"] = draw(st.integers(-2, 3))  # keep each request short
    return route, body


FUZZ_STATUSES: Counter = Counter()


@settings(
    max_examples=int(os.environ.get("MLCC_FUZZ_REQUESTS", "1000")),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(requests())
def fuzz_once(live_url, request):
    route, body = request
    r = httpx.post(live_url + route, content=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"})
    FUZZ_STATUSES[r.status_code] += 1
    assert r.status_code < 500, (route, body, r.text)
    if body.get("stream") is not True or r.status_code != 200:
        r.json()  # a JSON body, always


def test_fuzzed_requests_get_no_5xx(live):
    FUZZ_STATUSES.clear()
    fuzz_once(live.url)
    print("fuzzed requests by status:", dict(sorted(FUZZ_STATUSES.items())))
    assert sum(FUZZ_STATUSES.values()) >= 1000 or "MLCC_FUZZ_REQUESTS" in os.environ
    assert httpx.get(live.url + "/health").status_code == 200
    wait_idle(live.serving)
