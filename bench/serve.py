"""Serving benchmark: output tokens/s, time to first token and inter-token latency at 1, 4, 16 and 64 streams.

Starts `mlcc serve ARTIFACT` (and, with --gguf and llama_cpp installed, `python -m llama_cpp.server` on the
same model) and drives it with concurrent streaming /v1/completions requests, greedy, every request generating
exactly --max-tokens tokens (mlcc's `ignore_eos`, llama.cpp's `min_tokens`):

    python bench/serve.py ARTIFACT [--gguf MODEL.gguf] [--concurrency 1,4,16,64] [--max-tokens 64]

llama.cpp's server needs packages beyond llama-cpp-python, left out of mlcc's dependencies (bench only):

    pip install llama-cpp-python==0.3.36 sse-starlette starlette-context pydantic-settings

It runs one request at a time (requests queue behind a lock; no batching) and by default cuts a stream short
when another request arrives, so it is started with `--interrupt_requests False`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPT_WORDS = "Once upon a time there was a little robot who loved to compile programs and run them".split()


@dataclass
class StreamTiming:
    start: float
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0


@dataclass
class Row:
    server: str
    streams: int
    requests: int
    tokens_per_s: float
    ttft_ms: tuple[float, float]  # p50, p99
    itl_ms: tuple[float, float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], base: str, timeout: float = 300) -> subprocess.Popen:
    """Start a server process and wait until it answers /v1/models.

    Its output goes to a temporary file, not a pipe: llama.cpp logs hundreds of KB while loading, and a pipe
    nobody reads fills up and stalls the server."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"server exited: {' '.join(command)}\n{log.read()[-4000:]}")
        try:
            if httpx.get(base + "/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"server did not start in {timeout:.0f} s: {' '.join(command)}")


async def one_stream(client: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int) -> StreamTiming:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,  # mlcc
        "min_tokens": max_tokens,  # llama.cpp
        "stream_options": {"include_usage": True},
    }
    timing = StreamTiming(time.perf_counter())
    async with client.stream("POST", base + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                timing.tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                timing.chunk_times.append(time.perf_counter())
    return timing


async def run_level(base: str, model: str, streams: int, requests: int, max_tokens: int) -> tuple[float, list]:
    """`requests` requests, at most `streams` in flight; returns (wall seconds, timings)."""
    limit = asyncio.Semaphore(streams)

    async def bounded(i: int) -> StreamTiming:
        async with limit:
            prompt = " ".join(PROMPT_WORDS[: 4 + i % (len(PROMPT_WORDS) - 4)]) + f" {i}"
            return await one_stream(client, base, model, prompt, max_tokens)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=streams)) as client:
        start = time.perf_counter()
        timings = await asyncio.gather(*(bounded(i) for i in range(requests)))
        return time.perf_counter() - start, timings


def summarize(server: str, streams: int, wall: float, timings: list[StreamTiming]) -> Row:
    ttft = [1000 * (t.chunk_times[0] - t.start) for t in timings if t.chunk_times]
    itl = [1000 * d for t in timings for d in np.diff(t.chunk_times)]
    tokens = sum(t.tokens or len(t.chunk_times) for t in timings)

    def p50_p99(values: list[float]) -> tuple[float, float]:
        return (float(np.percentile(values, 50)), float(np.percentile(values, 99))) if values else (0.0, 0.0)

    return Row(server, streams, len(timings), tokens / wall, p50_p99(ttft), p50_p99(itl))


def bench(server: str, base: str, model: str, levels: list[int], per_stream: int, max_tokens: int) -> list[Row]:
    asyncio.run(run_level(base, model, 1, 1, 4))  # warm up
    rows = []
    for streams in levels:
        wall, timings = asyncio.run(run_level(base, model, streams, streams * per_stream, max_tokens))
        rows.append(summarize(server, streams, wall, timings))
        print(f"  {server}: {streams} streams done", file=sys.stderr)
    return rows


def print_table(rows: list[Row]) -> None:
    columns = ("streams", 7), ("requests", 8), ("out tok/s", 10), ("TTFT p50/p99 ms", 17), ("ITL p50/p99 ms", 16)
    header = f"{'server':<10} " + " ".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))
    for r in rows:
        ttft = f"{r.ttft_ms[0]:.1f}/{r.ttft_ms[1]:.1f}"
        itl = f"{r.itl_ms[0]:.1f}/{r.itl_ms[1]:.1f}"
        print(f"{r.server:<10} {r.streams:>7} {r.requests:>8} {r.tokens_per_s:>10.1f} {ttft:>17} {itl:>16}")


def llama_cpp_server_missing() -> str | None:
    """Why `python -m llama_cpp.server` cannot start here, or None (it needs extras beyond llama_cpp)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama_cpp is not installed"
    try:
        importlib.import_module("llama_cpp.server.app")
    except ImportError as e:
        return str(e)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="mlcc artifact folder")
    parser.add_argument("--gguf", help="also benchmark llama_cpp.server on this GGUF file (needs llama_cpp)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated stream counts")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]

    rows: list[Row] = []
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    mlcc = [sys.executable, "-m", "mlcc_cli", "serve", args.artifact, "--port", str(port)]
    proc = start_server(mlcc + ["--threads", str(args.threads)], base)
    try:
        model = Path(args.artifact).resolve().name
        rows += bench("mlcc", base, model, levels, args.requests_per_stream, args.max_tokens)
    finally:
        proc.terminate()
        proc.wait()

    if args.gguf:
        missing = llama_cpp_server_missing()
        if missing:
            print(f"llama_cpp.server cannot run ({missing}): skipping the comparison", file=sys.stderr)
        else:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            llama = [sys.executable, "-m", "llama_cpp.server", "--model", args.gguf, "--port", str(port)]
            threads = str(args.threads)
            options = ["--n_threads", threads, "--n_threads_batch", threads, "--interrupt_requests", "False"]
            proc = start_server(llama + options, base)
            try:
                rows += bench(
                    "llama.cpp", base, Path(args.gguf).name, levels, args.requests_per_stream, args.max_tokens
                )
            finally:
                proc.terminate()
                proc.wait()
    print_table(rows)


if __name__ == "__main__":
    main()
