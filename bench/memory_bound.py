"""Decode where weights do not fit the caches: random-weight Llama shapes as GGUF files, compiled by mlcc and run by
llama.cpp from the same file, next to this machine's measured memory read bandwidth.

    python bench/memory_bound.py WORKDIR [--shapes 1b 8b] [--types Q4_0 Q4_K] [--threads 1 2] [--runs 3]

For each shape and block type: writes WORKDIR/<shape>-<type>.gguf (random valid blocks, no quantizing), compiles it
with mlcc (default numerics), and reports per thread count the decode tokens/s of each engine (median of `--runs`,
one process per engine and run, the engines alternating), the weight bytes a decoded token reads (every matrix but
the embedding table, of which one row), the read bandwidth (measured before each engine run: the median of a
row's, and its range), each engine's share of it (the median over its runs of the bandwidth a run implies over
the probe just before it), and mlcc / llama.cpp: the median of each run's ratio, the two engines' runs side by
side in time, and their range. A shared VM's bandwidth moves by half from minute to minute: a ratio or share of
two medians would mix its states.
llama.cpp is skipped when llama-cpp-python is not installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # Llama 3.2 1B and Llama 3 8B proportions (vocabulary 32k)
    "1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=32000),
    "8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=32000),
}
PROMPT_TOKENS = 16
WIDTHS = (9, 7, 9, 5, 11, 10, 6, 9, 6, 6, 11)


def random_blocks(rows: int, cols: int, qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """[rows, bytes per row] of valid blocks: random codes, small float16 scales (and mins for K-quants)."""
    block, size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scales = np.array([0.002, 0.001], np.float16).view(np.uint8)  # d, then dmin (K-quants)
    data[..., :2] = scales[:2]
    if qtype == GGMLQuantizationType.Q4_K:
        data[..., 2:4] = scales[2:]
    return data.reshape(rows, -1)


def write_model(path: Path, shape: dict[str, int], qtype: GGMLQuantizationType) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from mixtral_gguf import _add_tokenizer

    rng = np.random.default_rng(0)
    h, i, heads, kv = shape["hidden"], shape["intermediate"], shape["heads"], shape["kv_heads"]
    head_dim = h // heads
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(h)
    writer.add_block_count(shape["layers"])
    writer.add_feed_forward_length(i)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    _add_tokenizer(writer, shape["vocab"])

    def matrix(name: str, rows: int, cols: int) -> None:
        writer.add_tensor(name, random_blocks(rows, cols, qtype, rng), raw_dtype=qtype)

    matrix("token_embd.weight", shape["vocab"], h)
    writer.add_tensor("output_norm.weight", np.ones(h, np.float32))
    matrix("output.weight", shape["vocab"], h)
    for layer in range(shape["layers"]):
        blk = f"blk.{layer}"
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(h, np.float32))
        writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(h, np.float32))
        matrix(f"{blk}.attn_q.weight", heads * head_dim, h)
        matrix(f"{blk}.attn_k.weight", kv * head_dim, h)
        matrix(f"{blk}.attn_v.weight", kv * head_dim, h)
        matrix(f"{blk}.attn_output.weight", h, heads * head_dim)
        matrix(f"{blk}.ffn_gate.weight", i, h)
        matrix(f"{blk}.ffn_up.weight", i, h)
        matrix(f"{blk}.ffn_down.weight", h, i)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def bytes_per_token(path: Path) -> int:
    """Weight bytes a decoded token reads: all tensors, but one row of the embedding table."""
    total = 0
    for t in GGUFReader(str(path)).tensors:
        rows = int(np.prod(t.shape[1:])) if t.name == "token_embd.weight" else 1
        total += int(t.n_bytes) // rows
    return total


def read_bandwidth(threads: int, gib: float = 2.0, runs: int = 5) -> float:
    """Bytes/s of the maximum of a buffer far larger than the caches, split over `threads` (numpy releases the
    GIL). A SIMD max is memory-bound on one core where numpy's pairwise sum is not (AMD EPYC Zen 4, 1 thread: 31
    vs 25 GB/s, which put mlcc's 1-thread kernels at over 100% of it)."""
    data = np.ones(int(gib * 2**30) // 4, np.float32)
    parts = np.array_split(data, threads)
    best = 0.0
    for _ in range(runs):
        workers = [threading.Thread(target=np.maximum.reduce, args=(p,)) for p in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, data.nbytes / (time.perf_counter() - start))
    return best


def decode_mlcc(artifact: str, threads: int, runs: int, tokens: int) -> float:
    sys.path.insert(0, str(ROOT))
    from runtime.engine import Engine
    from runtime.sampler import SamplingParams

    engine = Engine(artifact, verify=False, max_batch_size=1, kv_cache_tokens=1024, threads=threads)
    ids = list(range(2, 2 + PROMPT_TOKENS))
    rates = []
    for _ in range(runs + 1):  # decode time = (prefill + tokens + 1) - (prefill + 1); the first run warms up
        start = time.perf_counter()
        engine.generate_ids([ids], SamplingParams(max_tokens=1, temperature=0))
        first = time.perf_counter() - start
        start = time.perf_counter()
        engine.generate_ids([ids], SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True))
        rates.append(tokens / (time.perf_counter() - start - first))
    return statistics.median(rates[1:])


def decode_llamacpp(gguf: str, threads: int, runs: int, tokens: int) -> float:
    from llama_cpp import Llama

    llm = Llama(gguf, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = list(range(2, 2 + PROMPT_TOKENS))
    rates = []
    for _ in range(runs + 1):  # the first run warms up
        llm.reset()
        llm.eval(ids)
        start = time.perf_counter()
        for _ in range(tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def child(kind: str, path: str, threads: int, runs: int, tokens: int) -> float | None:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, path, str(threads), str(runs), str(tokens)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        print(f"  {kind} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def llamacpp_info() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.llama_print_system_info().decode().strip()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, path, threads, runs, tokens = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
        measure = decode_mlcc if kind == "mlcc" else decode_llamacpp
        print(json.dumps(measure(path, threads, runs, tokens)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--shapes", nargs="+", default=["1b"], choices=sorted(SHAPES))
    parser.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K"], choices=["Q4_0", "Q4_K", "Q8_0"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens per run")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from compiler.compile import compile_model

    args.workdir.mkdir(parents=True, exist_ok=True)
    info = llamacpp_info()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"CPU: {cpu}; llama.cpp: {info or 'not installed'}")
    print("read bandwidth: measured before each engine run (the VM's neighbours drift), the row's median; an")
    print("engine's share of it: the median of its runs', each over the probe just before it")
    header = [
        "model",
        "threads",
        "MB/token",
        "GB/s",
        "GB/s range",
        "mlcc tok/s",
        "of bw",
        "llama.cpp",
        "of bw",
        "ratio",
        "ratio range",
    ]
    print(" ".join(f"{c:>{w}}" for c, w in zip(header, WIDTHS)))
    for shape in args.shapes:
        for type_name in args.types:
            gguf = args.workdir / f"{shape}-{type_name}.gguf"
            artifact = args.workdir / f"{shape}-{type_name}"
            if not gguf.is_file():
                write_model(gguf, SHAPES[shape], GGMLQuantizationType[type_name])
            if not artifact.is_dir():
                compile_model(str(gguf), artifact, progress=lambda _: None)
            per_token = bytes_per_token(gguf)
            for threads in args.threads:
                # one process per engine and run, the engines alternating: the VM's neighbours drift over minutes
                engines = [("mlcc", artifact)] + ([("llamacpp", gguf)] if info else [])
                rates: dict[str, list[float]] = {"mlcc": [], "llamacpp": []}
                shares: dict[str, list[float]] = {"mlcc": [], "llamacpp": []}
                probes, ratios = [], []
                for _ in range(args.runs):
                    run = {}
                    for kind, path in engines:
                        probes.append(read_bandwidth(threads))
                        run[kind] = child(kind, str(path), threads, 1, args.tokens)
                        if run[kind]:
                            rates[kind].append(run[kind])
                            shares[kind].append(run[kind] * per_token / probes[-1])
                    if run.get("mlcc") and run.get("llamacpp"):
                        ratios.append(run["mlcc"] / run["llamacpp"])
                bandwidth = statistics.median(probes)
                cells = [f"{shape}-{type_name:<4}", threads, f"{per_token / 1e6:.0f}", f"{bandwidth / 1e9:.1f}"]
                cells.append(f"{min(probes) / 1e9:.0f}-{max(probes) / 1e9:.0f}")
                for kind in rates:
                    if rates[kind]:
                        cells += [f"{statistics.median(rates[kind]):.2f}", f"{statistics.median(shares[kind]):.0%}"]
                    else:
                        cells += ["-", "-"]
                cells.append(f"{statistics.median(ratios):.2f}" if ratios else "-")
                cells.append(f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-")
                print(" ".join(f"{c:>{w}}" for c, w in zip(cells, WIDTHS)), flush=True)


if __name__ == "__main__":
    main()
