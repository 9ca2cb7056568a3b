"""The OpenAI-compatible server, driven in-process with the official `openai` client."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn

from runtime import Engine, SamplingParams, ServingEngine
from runtime.server import create_app

API_KEY = "test-key"
MODEL = "tiny-llama"
SHARED = "Once upon a time there was a little robot who loved to compile programs. The quick brown fox jumps"


@pytest.fixture(scope="module")
def reference(artifact) -> Engine:
    """Each expected text comes from a request run alone, without the prefix cache."""
    return Engine(artifact("llama-q4"), prefix_cache=False)


@contextmanager
def running(serving: ServingEngine) -> Iterator[str]:
    """Serve `serving` on a free local port in a thread; yields its base URL, closes it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(serving, MODEL, api_key=API_KEY)
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        http.should_exit = True
        thread.join()
        serving.close()


@pytest.fixture(scope="module")
def server(artifact):
    serving = ServingEngine(artifact("llama-q4"), max_batch_size=8)
    with running(serving) as url:
        yield serving, url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=API_KEY, max_retries=0)


def alone(reference: Engine, prompt: str, max_tokens: int, chat: bool = False):
    ids = reference.tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else None
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return reference.generate_ids([ids], params)[0] if chat else reference.generate(prompt, params)[0]


def test_chat_and_completion_match_the_engine(client, reference):
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=12, temperature=0
    )
    expected = alone(reference, "Hello", 12, chat=True)
    assert chat.choices[0].message.content == expected.text
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == expected.finish_reason
    assert chat.usage.prompt_tokens == expected.prompt_tokens
    assert chat.usage.completion_tokens == len(expected.token_ids)
    assert chat.usage.total_tokens == expected.prompt_tokens + len(expected.token_ids)

    completion = client.completions.create(model="llama", prompt="Once upon", max_tokens=10, temperature=0)
    assert completion.choices[0].text == alone(reference, "Once upon", 10).text
    assert completion.model == MODEL
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_streaming_chunks_join_to_the_non_streamed_text(client, reference):
    messages = [{"role": "user", "content": "Tell me a story"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])

    streamed = client.completions.create(model=MODEL, prompt="Hello", max_tokens=15, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == alone(reference, "Hello", 15).text


def test_sse_wire_format(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}
    response = httpx.post(server[1] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_logprobs_and_n(client, reference):
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy twice
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 4 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    assert entries[0].top_logprobs[0].logprob >= entries[0].top_logprobs[1].logprob


def test_errors_are_openai_shaped_and_the_server_keeps_serving(server, client):
    base = server[1]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(base + "/v1/models").status_code == 401
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hello " * 300, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model=MODEL, prompt=[0, 10**6], max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature="hot")
    assert e.value.body["param"] == "temperature"
    malformed = httpx.post(
        base + "/v1/chat/completions",
        content=b'{"model": "tiny-llama", "messages": [',
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert malformed.status_code == 400
    assert set(malformed.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0).choices[0].text is not None


def test_sixteen_concurrent_clients_each_get_their_solo_text(client, reference):
    jobs = [(f"{SHARED[: 5 + 6 * i]} {i}", 4 + 3 * i) for i in range(16)]
    expected = [alone(reference, prompt, max_tokens).text for prompt, max_tokens in jobs]

    def ask(job: tuple[str, int]) -> str:
        prompt, max_tokens = job
        if len(prompt) % 2:
            pieces = client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
            )
            return "".join(c.choices[0].text for c in pieces)
        return (
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text
        )

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(ask, jobs)) == expected


def test_prefix_cache_over_http(client, reference):
    first = client.completions.create(model=MODEL, prompt=SHARED + " and then", max_tokens=8, temperature=0)
    second = client.completions.create(model=MODEL, prompt=SHARED + " over the dog", max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= 16
    assert first.choices[0].text == alone(reference, SHARED + " and then", 8).text
    assert second.choices[0].text == alone(reference, SHARED + " over the dog", 8).text


def test_client_disconnect_aborts_the_request(server):
    serving, base = server
    step = serving.engine.step

    def slow_step() -> None:  # slow enough that the request is still running when the client leaves
        time.sleep(0.02)
        step()

    serving.engine.step = slow_step
    aborted = serving.stats["aborted_requests_total"]
    try:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 100, "stream": True, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.stream("POST", base + "/v1/completions", json=body, headers=headers) as response:
            next(response.iter_lines())
        deadline = time.monotonic() + 5
        while serving.stats["aborted_requests_total"] == aborted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert serving.stats["aborted_requests_total"] == aborted + 1
        assert serving.stats["requests_running"] == 0
    finally:
        del serving.engine.step


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
    text = httpx.get(server[1] + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    for name in ["requests_running", "requests_waiting", "kv_cache_tokens_used", "generation_tokens_per_second"]:
        assert f"mlcc_{name}" in values
    assert values["mlcc_generation_tokens_total"] > 0
    assert "# TYPE mlcc_generation_tokens_total counter" in text
    assert "# TYPE mlcc_requests_preempted_total counter" in text and "mlcc_requests_preempted_total" in values
