"""Speed of the llama.cpp-exact GGUF matmul kernels (tir_kernels/matmul_llamacpp*.py) next to the `gguf-fast` ones.

    TVM_NUM_THREADS=1 python bench/exact_matmul.py [--tokens 1 128]

Random GGUF blocks of the shapes the real models use; prints microseconds and GMAC/s per kernel (median of 7
runs of 5 calls). `exact+vnni` is the exact kernel with `vpdpbusd`, where the CPU has it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tvm
from gguf import GGMLQuantizationType as Q

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_gguf_exact import _blocks  # noqa: E402

from compiler.targets import TargetRequest, resolve_target, strict_float  # noqa: E402
from tir_kernels.matmul_int8 import int8_matmul  # noqa: E402
from tir_kernels.matmul_llamacpp import llamacpp_matmul  # noqa: E402
from tir_kernels.repack import GROUP_LAYOUTS, INTERLEAVED, group_rows, interleave_rows  # noqa: E402
from tir_kernels.simd import has_vnni  # noqa: E402

SHAPES = [(Q.Q5_0, 640, 2048), (Q.Q8_0, 640, 256), (Q.Q4_1, 576, 1536), (Q.Q4_K, 2048, 640), (Q.Q6_K, 2048, 640)]


def kernels(qtype: Q, n_in: int, n_out: int, raw: np.ndarray, vnni: bool):
    yield "exact", llamacpp_matmul(qtype, n_in, n_out), group_rows(raw, qtype)
    if vnni and qtype in GROUP_LAYOUTS:
        yield "exact+vnni", llamacpp_matmul(qtype, n_in, n_out, True), group_rows(raw, qtype)
    interleaved = qtype in INTERLEAVED
    data = interleave_rows(raw, qtype) if interleaved else raw
    yield "fast", int8_matmul(qtype, n_in, n_out, raw.shape[1], interleaved), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128])
    args = parser.parse_args()
    target = strict_float(resolve_target(TargetRequest())).target
    rng = np.random.default_rng(0)
    print(f"{'kernel':28s} {'kind':10s} {'tokens':>6s} {'us':>10s} {'GMAC/s':>7s}")
    for qtype, n_in, n_out in SHAPES:
        raw = _blocks(qtype, n_out, n_in, rng)
        for kind, kernel, data in kernels(qtype, n_in, n_out, raw, has_vnni(target)):
            lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=target)
            weights = tvm.runtime.tensor(data)
            for n in args.tokens:
                x = tvm.runtime.tensor(rng.standard_normal((n, n_in)).astype(np.float32))
                y = tvm.runtime.tensor(np.zeros((n, n_out), np.float32))
                lib["main"](x, weights, y)
                times = []
                for _ in range(7):
                    start = time.perf_counter()
                    for _ in range(5):
                        lib["main"](x, weights, y)
                    times.append((time.perf_counter() - start) / 5)
                t = statistics.median(times)
                name = f"{qtype.name} {n_in}x{n_out}"
                print(f"{name:28s} {kind:10s} {n:6d} {t * 1e6:10.1f} {n * n_in * n_out / t / 1e9:7.2f}")


if __name__ == "__main__":
    main()
