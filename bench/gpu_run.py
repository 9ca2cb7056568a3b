"""Real models on a GPU machine that has TVM's runtime only: compiled here, checked and timed there.

On the compiling machine:
    python bench/gpu_run.py reference CPU_ARTIFACT REF.npz    # prompt logits and 64 greedy tokens of a CPU build
    python bench/gpu_run.py template ARTIFACT T.npz [--rows 64]  # its weights once each, or a few rows per shape
On the GPU machine (runtime/ and artifacts/ alone, no compiler):
    python bench/gpu_run.py fill ARTIFACT T.npz               # the weight shards written from them
    python bench/gpu_run.py check ARTIFACT... [--reference REF.npz ...] [--batch 64] [--json OUT]

The reference is the same model built for the CPU with float32 activations (`--quant gguf-f32` for a GGUF file):
the GPU build's arithmetic, summed in another order. `template` and `fill` carry the weights in a form that can be
cut into parts for the transfer: a real model's tensors, each distinct one once, or for an 8B shape (random weights)
a few rows of valid blocks per shape, tiled there to full size: the kernels do the work of real weights.
`check` prints a row per artifact: max |logit difference| at the prompt's last token and how many greedy tokens
agree (with a reference), prefill tokens/s, decode tokens/s at batch 1 through the engine (host sampling
included) and of the model call alone, decode tokens/s at `--batch`, the weight bytes a decoded token reads and
that rate against the GPU's read bandwidth (measured with torch where it is installed). `--profile` adds the
slowest functions of a decode step.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from artifacts import load_manifest  # noqa: E402
from artifacts.manifest import describe_files  # noqa: E402
from runtime.benchmark import DECODE_TOKENS, PREFILL_LENGTHS, decode_rate, prefill_rate, prompt_ids  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.sampler import SamplingParams  # noqa: E402

PROMPT_TOKENS = 64
GREEDY_TOKENS = 64
EMBEDDING = "token_embd."  # read one row per token, not whole


def reference(cpu_artifact: Path, out: Path) -> None:
    engine = Engine(cpu_artifact, verify=False, max_batch_size=1, kv_cache_tokens=1024)
    ids = prompt_ids(engine.tokenizer.encode, PROMPT_TOKENS)
    greedy = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)
    tokens = engine.generate_ids([ids], greedy)[0].token_ids
    np.savez(out, ids=np.array(ids), logits=engine.prefill_logits([ids])[0], tokens=np.array(tokens))


def _weights(folder: Path):
    """(shard, name, slice) of every weight in the artifact."""
    for shard in load_manifest(folder).weights["shards"]:
        with safe_open(str(folder / shard), framework="numpy") as f:
            for name in f.keys():
                yield shard, name, f.get_slice(name)


def template(artifact: Path, out: Path, rows: int | None) -> None:
    """The weights for `fill`, each distinct tensor once: with `rows`, the first rows of one tensor per shape and
    type (random weights tile them); without, every tensor whole (a tied output head is the embedding again)."""
    kept, layout = {}, {}
    for shard, name, tensor in _weights(artifact):
        shape, dtype = tensor.get_shape(), tensor.get_dtype()
        if rows is None:
            data = tensor[:]
            key = hashlib.sha256(data.tobytes()).hexdigest()[:16] + dtype
        else:
            data = tensor[: min(shape[0], rows)] if len(shape) > 1 else tensor[:]
            key = f"{dtype}{shape}"
        kept.setdefault(key, data)
        layout[name] = (shard, shape, key)
    np.savez(out, layout=np.array(json.dumps(layout)), **kept)


def fill(artifact: Path, template_file: Path) -> None:
    """Write the artifact's weight shards from `template`'s tensors, repeated to each weight's shape."""
    data = np.load(template_file)
    layout = json.loads(str(data["layout"]))
    manifest = load_manifest(artifact)
    for shard in manifest.weights["shards"]:
        tensors = {name: np.resize(data[key], shape) for name, (where, shape, key) in layout.items() if where == shard}
        save_file(tensors, str(artifact / shard))
    manifest.files.update(describe_files(artifact, manifest.weights["shards"]))
    manifest.write(artifact)


def bytes_per_token(artifact: Path) -> int:
    """Weight bytes a decoded token reads: every weight, but one row of the embedding table, whose whole is read
    again where a tied output head is stored as it."""
    sizes, total = {}, 0
    for _, name, tensor in _weights(artifact):
        shape = tensor.get_shape()
        sizes[name] = int(np.prod(shape)) * _dtype(tensor.get_dtype()).itemsize
        total += sizes[name] // shape[0] if name.startswith(EMBEDDING) else sizes[name]
    return total + sum(sizes[stored] for stored in load_manifest(artifact).weights.get("aliases", {}).values())


def _dtype(safetensors_name: str) -> np.dtype:
    names = {"F32": "float32", "F16": "float16", "U8": "uint8", "I8": "int8", "U32": "uint32", "I32": "int32"}
    return np.dtype(names[safetensors_name])


def read_bandwidth() -> float | None:
    """Bytes/s of a sum over 4 GiB on the GPU (read-bound), best of 10; None without torch or a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    x = torch.ones(2**30, dtype=torch.float32, device="cuda")
    x.sum()
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        x.sum()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del x
    torch.cuda.empty_cache()
    return 4 * 2**30 / best


def model_call_rate(engine: Engine, steps: int = DECODE_TOKENS) -> float:
    """Decode steps/s of the model call alone (token in, logits left on the device), one sequence."""
    seq = engine.kv.add()
    token = np.array([engine.tokenizer.encode("The")[0]], np.int32)
    try:
        engine._forward(engine._decode, [seq], [1], token)
        engine.artifact.device.sync()
        start = time.perf_counter()
        for _ in range(steps):
            engine._forward(engine._decode, [seq], [1], token)
        engine.artifact.device.sync()
        return steps / (time.perf_counter() - start)
    finally:
        engine.kv.remove(seq)


def profile(engine: Engine, steps: int = 32) -> list[tuple[str, float, int]]:
    """(function, ms per decode step, calls per step) of the VM's calls, the device synced after each."""
    totals: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    starts: list[float] = []
    device = engine.artifact.device

    def instrument(func, name, before, ret, *args):
        device.sync()
        if before:
            starts.append(time.perf_counter())
        else:
            totals[name] += time.perf_counter() - starts.pop()
            counts[name] += 1
        return 0

    seq = engine.kv.add()
    token = np.array([engine.tokenizer.encode("The")[0]], np.int32)
    engine._forward(engine._decode, [seq], [1], token)
    engine.artifact.vm.set_instrument(instrument)
    try:
        for _ in range(steps):
            engine._forward(engine._decode, [seq], [1], token)
    finally:
        engine.kv.remove(seq)  # the instrument stays: the engine's last use
    return [(name, t / steps * 1e3, counts[name] // steps) for name, t in totals.most_common(12)]


def check(artifact: Path, ref: Path | None, batch: int, with_profile: bool) -> dict:
    row: dict = {"artifact": artifact.name}
    engine = Engine(artifact, verify=False, max_batch_size=batch, kv_cache_tokens=max(4096, batch * 256))
    if ref is not None:
        data = np.load(ref)
        ids = [int(i) for i in data["ids"]]
        row["max_dlogit"] = float(np.abs(engine.prefill_logits([ids])[0] - data["logits"]).max())
        greedy = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)
        tokens = engine.generate_ids([ids], greedy)[0].token_ids
        row["greedy_agree"] = next((i for i, (a, b) in enumerate(zip(tokens, data["tokens"])) if a != b), len(tokens))
    for n in (n for n in PREFILL_LENGTHS if n < engine.context_window):
        row[f"prefill_{n}"] = prefill_rate(engine, n, runs=5)
    prompt = prompt_ids(engine.tokenizer.encode, 16)
    engine.generate_ids([prompt], SamplingParams(max_tokens=1, temperature=0))  # warm-up
    row["decode_1"] = decode_rate(engine, [prompt], runs=3)
    row["model_call_1"] = model_call_rate(engine)
    prompts = [prompt[i % 16 :] + prompt[: i % 16] + [i] for i in range(batch)]  # distinct: no shared prefix
    engine.generate_ids(prompts, SamplingParams(max_tokens=1, temperature=0))  # warm-up at this batch size
    row[f"decode_{batch}"] = decode_rate(engine, prompts, runs=2)
    row["bytes_per_token"] = bytes_per_token(artifact)
    if with_profile:
        row["profile"] = profile(engine)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, first, second in (
        ("reference", "cpu_artifact", "out"),
        ("template", "artifact", "out"),
        ("fill", "artifact", "template"),
    ):
        sub = commands.add_parser(name)
        sub.add_argument(first, type=Path)
        sub.add_argument(second, type=Path)
        if name == "template":
            sub.add_argument("--rows", type=int, help="Only the first rows of one tensor per shape (random weights).")
    sub = commands.add_parser("check")
    sub.add_argument("artifacts", type=Path, nargs="+")
    sub.add_argument("--reference", type=Path, nargs="*", default=[], help="One per artifact, in order, or none.")
    sub.add_argument("--batch", type=int, default=64)
    sub.add_argument("--profile", action="store_true")
    sub.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.command == "reference":
        return reference(args.cpu_artifact, args.out)
    if args.command == "template":
        return template(args.artifact, args.out, args.rows)
    if args.command == "fill":
        return fill(args.artifact, args.template)

    bandwidth = read_bandwidth()
    print(f"read bandwidth: {bandwidth / 1e9:.0f} GB/s (torch, a sum of 4 GiB)" if bandwidth else "no torch")
    rows = []
    for i, artifact in enumerate(args.artifacts):
        ref = args.reference[i] if i < len(args.reference) else None
        try:
            row = check(artifact, ref, args.batch, args.profile)
        except Exception as e:  # one artifact's failure is reported; the others still run
            row = {"artifact": artifact.name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        if "decode_1" in row and bandwidth:
            row["fraction_of_bandwidth"] = row["model_call_1"] * row["bytes_per_token"] / bandwidth
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"bandwidth": bandwidth, "rows": rows}, indent=1))
    print(
        f"\n{'artifact':14} {'max|dlogit|':>11} {'greedy':>7} {'prefill128':>10} {'prefill512':>10} {'dec b1':>7} "
        f"{'call b1':>8} {f'dec b{args.batch}':>8} {'MB/token':>9} {'% read bw':>9}"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['artifact']:14} {row['error']}")
            continue

        def cell(key: str, width: int, fmt: str = ".0f", row: dict = row) -> str:
            return f"{row[key]:>{width}{fmt}}" if key in row else f"{'-':>{width}}"

        print(
            f"{row['artifact']:14} {cell('max_dlogit', 11, '.2e')} {cell('greedy_agree', 7, 'd')} "
            f"{cell('prefill_128', 10)} {cell('prefill_512', 10)} {cell('decode_1', 7)} {cell('model_call_1', 8)} "
            f"{cell(f'decode_{args.batch}', 8)} {row['bytes_per_token'] / 1e6:>9.1f} "
            + (f"{100 * row['fraction_of_bandwidth']:>8.1f}%" if "fraction_of_bandwidth" in row else f"{'-':>9}")
        )
        for name, ms, calls in row.get("profile", []):
            print(f"    {ms:8.3f} ms  {calls:4d}x  {name}")


if __name__ == "__main__":
    main()
