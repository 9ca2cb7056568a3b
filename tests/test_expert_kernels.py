"""GGUF experts multiply 8-bit activations with the dense layers' integer kernels: the grouped expert kernel's
rows are bit for bit what the dense kernel gives each expert's rows, in both numerics."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from test_gguf_kernels import FLOAT16_FIELDS

from quant_schemes.gguf_native import Int8Rows
from tir_kernels.experts import grouped_rows_kernel
from tir_kernels.gguf_blocks import BlockFormat
from tir_kernels.numerics import Numerics

Q = GGMLQuantizationType
EXPERTS, TOP_K, COLS = 5, 2, 512
ROWS = 20  # not a multiple of 8: each expert's last row group is padded

# (type, numerics): interleaved and plain layouts of mlcc's kernels, and llama.cpp's (incl. its K-quant kernel)
CASES = [
    (Q.Q4_0, Numerics.MLCC),
    (Q.Q8_0, Numerics.MLCC),
    (Q.Q4_K, Numerics.MLCC),
    (Q.Q4_1, Numerics.LLAMACPP),
    (Q.Q6_K, Numerics.LLAMACPP),
]


def random_blocks(rng: np.random.Generator, qtype: GGMLQuantizationType, rows: int) -> np.ndarray:
    """`rows` rows of COLS columns of valid blocks with finite, moderate float16 scales."""
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, COLS // block, block_bytes), dtype=np.uint8)
    for at in FLOAT16_FIELDS[qtype]:
        raw[..., at + 1] &= 0xBB
    return raw.reshape(rows, -1)


@pytest.mark.parametrize(("qtype", "numerics"), CASES, ids=lambda c: c.name if isinstance(c, Q) else c.value)
def test_grouped_rows_equal_the_dense_kernel_per_expert(qtype: GGMLQuantizationType, numerics: Numerics):
    from compiler.targets import _host_llvm
    from tir_kernels.simd import has_amx, has_avx2, has_vnni, vector_registers

    target = _host_llvm()
    if not has_avx2(target):
        pytest.skip("the int8 kernels need an x86 CPU with AVX2")
    rng = np.random.default_rng(qtype.value)
    vnni, registers, amx = has_vnni(target), vector_registers(target), has_amx(target)  # AMX: tiles of 16 tokens
    layout = Int8Rows(BlockFormat(qtype), COLS, ROWS, numerics, vnni, registers, amx)
    blocks = [random_blocks(rng, qtype, ROWS) for _ in range(EXPERTS)]
    packed = [layout.pack(b) for b in blocks]
    grouped = grouped_rows_kernel(EXPERTS, layout.rows, TOP_K).with_attr("global_symbol", "grouped")
    dense = layout.rows.kernel.with_attr("global_symbol", "dense")
    lib = tvm.compile(tvm.IRModule({"grouped": grouped, "dense": dense}), target=target)
    all_experts = tvm.runtime.tensor(np.concatenate(packed))
    for tokens in (1, 3, 37, 300):  # decode, a few, and enough that some experts get a tile's worth
        x = rng.standard_normal((tokens, COLS)).astype(np.float32)
        experts = np.stack([rng.choice(EXPERTS - 1, TOP_K, replace=False) for _ in range(tokens)])  # never the last
        pairs = experts.reshape(-1)
        order = np.argsort(pairs, kind="stable").astype(np.int32)  # sorted row -> pair, tokens in order
        starts = np.zeros(EXPERTS + 1, np.int32)
        np.cumsum(np.bincount(pairs, minlength=EXPERTS), out=starts[1:])
        out = tvm.runtime.tensor(np.full((len(pairs), ROWS), np.nan, np.float32))
        lib["grouped"](tvm.runtime.tensor(x), tvm.runtime.tensor(starts), tvm.runtime.tensor(order), all_experts, out)
        got = out.numpy()
        for e in range(EXPERTS - 1):
            rows = x[order[starts[e] : starts[e + 1]] // TOP_K]
            if len(rows) == 0:
                continue
            expected = tvm.runtime.tensor(np.zeros((len(rows), ROWS), np.float32))
            lib["dense"](tvm.runtime.tensor(rows), tvm.runtime.tensor(packed[e]), expected)
            np.testing.assert_array_equal(got[starts[e] : starts[e + 1]], expected.numpy())
            # and that is expert e's product (8-bit activations: close, not equal)
            weights = dequantize(blocks[e], qtype).reshape(ROWS, COLS)
            reference = rows @ weights.T
            np.testing.assert_allclose(got[starts[e] : starts[e + 1]], reference, atol=0.02 * np.abs(reference).max())
