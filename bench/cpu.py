"""CPU speed of mlcc next to llama.cpp on the same GGUF, same machine, same run.

    python bench/cpu.py ARTIFACT MODEL.gguf [--runs 5] [--threads 1 2] [--rounds 1]

Prefill tokens/s for a 128- and a 512-token prompt and decode tokens/s for 128 new tokens (after a 16-token
prompt, and after a 2000-token one: "decode @2000", where attention reads a long cache each token), median of
`--runs`, each engine and thread count in its own process. Prints the instruction sets each side uses (the
artifact's target CPU and features, llama.cpp's `llama_print_system_info`), then a table with the ratio
mlcc / llama.cpp. On a machine whose speed drifts (a shared VM), `--rounds N` runs the two engines' processes N
times in turn and reports each side's median and the median of the N ratios, each from a pair run back to back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure_mlcc(artifact: str, threads: int, runs: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from runtime.benchmark import measure

    return measure(artifact, threads, runs)


def measure_llamacpp(gguf: str, threads: int, runs: int) -> dict[str, float]:
    import numpy as np
    from llama_cpp import Llama

    sys.path.insert(0, str(ROOT))
    from runtime.benchmark import DECODE_TOKENS, LONG_CONTEXT, PREFILL_LENGTHS, prompt_ids

    llm = Llama(gguf, n_ctx=4096, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    results: dict[str, float] = {}
    for n in PREFILL_LENGTHS:
        ids = prompt_ids(lambda t: llm.tokenize(t.encode(), add_bos=False), n)
        times = []
        for _ in range(runs + 1):
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            times.append(time.perf_counter() - start)
        results[f"prefill {n}"] = n / statistics.median(times[1:])

    def greedy() -> int:
        """The argmax of the last token's logits (llama.cpp keeps only those; `scores` stays unwritten)."""
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    for test, n in ((f"decode {DECODE_TOKENS}", 16), (f"decode @{LONG_CONTEXT}", LONG_CONTEXT)):
        ids = prompt_ids(lambda t: llm.tokenize(t.encode(), add_bos=False), n)
        rates = []
        for _ in range(runs):
            llm.reset()
            llm.eval(ids)
            start = time.perf_counter()
            for _ in range(DECODE_TOKENS):
                llm.eval([greedy()])
            rates.append(DECODE_TOKENS / (time.perf_counter() - start))
        results[test] = statistics.median(rates)
    return results


def instruction_sets(artifact: str) -> list[str]:
    """One line per side: the CPU and features the artifact was compiled for, and what llama.cpp was built with."""
    sys.path.insert(0, str(ROOT))
    from artifacts import load_manifest

    target = load_manifest(artifact).target
    ours = f"mlcc: {target.get('name')} cpu={target.get('cpu')} features={' '.join(target.get('cpu_flags') or [])}"
    proc = subprocess.run(
        [sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
        capture_output=True,
        text=True,
    )
    theirs = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else "unknown"
    return [ours, f"llama.cpp: {theirs}"]


def child(kind: str, path: str, threads: int, runs: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, path, str(threads), str(runs)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, path, threads, runs = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        measure = measure_mlcc if kind == "mlcc" else measure_llamacpp
        print(json.dumps(measure(path, threads, runs)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("gguf")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=1, help="pairs of engine processes per thread count")
    args = parser.parse_args()
    for line in instruction_sets(args.artifact):
        print(line)
    print(f"{'threads':>7} {'test':>12} {'mlcc tok/s':>11} {'llama.cpp':>10} {'ratio':>6}")
    for threads in args.threads:
        rounds = [
            (child("mlcc", args.artifact, threads, args.runs), child("llamacpp", args.gguf, threads, args.runs))
            for _ in range(args.rounds)
        ]
        for test in rounds[0][0]:
            ours = statistics.median(r[0][test] for r in rounds)
            theirs = statistics.median(r[1][test] for r in rounds)
            ratio = statistics.median(r[0][test] / r[1][test] for r in rounds)
            print(f"{threads:>7} {test:>12} {ours:>11.1f} {theirs:>10.1f} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
