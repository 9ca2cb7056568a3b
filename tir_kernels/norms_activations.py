"""RMSNorm, SwiGLU and GeGLU computed as llama.cpp's CPU backend computes them (ggml_rms_norm,
ggml_vec_swiglu_f32, ggml_vec_geglu_f32), each a row-wise kernel and the nn module that runs it in place of
the model's own (compiler/numerics.py swaps them in for llama.cpp numerics):

- RMSNorm: the sum of squares in float64, one element at a time (8 rows side by side, one in each lane).
- SwiGLU: silu(g) * u with ggml's vector exp (`ggml_v_expf`), libm's expf for a row's last n % 8 elements.
- GeGLU: ggml's table of GeLU-tanh at every float16 (libm's tanhf, rounded to float16; a constant of the
  compiled library) at x rounded to float16, times u; 0 below -10 and x * u above 10.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T

from tir_kernels.ggml_math import gelu_f16_table, v_expf
from tir_kernels.simd import LANES, each_row, each_span, splat


def _square(x: tirx.Buffer, row: tirx.PrimExpr, c: tirx.PrimExpr) -> tirx.PrimExpr:
    """x[row, 8c .. 8c + 8] squared, in float32 as ggml squares."""
    lanes = tirx.BufferLoad(x, [row, tirx.Ramp(c * LANES, 1, LANES)])
    return lanes * lanes


def _add_columns(total: tirx.PrimExpr, rows: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """total + column 0 + column 1 + ... of the 8 x 8 block `rows`, one column at a time, in float64."""
    for i in range(LANES):
        column = tirx.Shuffle(rows, [tirx.IntImm("int32", LANES * j + i) for j in range(LANES)])
        total = total + column.astype("float64x8")
    return total


@functools.cache
def rms_norm_kernel(hidden: int, eps: float) -> tirx.PrimFunc:
    """ggml_rms_norm + ggml_mul: sum of squares in float64 in order, scale = 1 / sqrtf(mean + eps). A row's
    sum is one chain of dependent adds: 8 rows go side by side (1 thread, 128 x 640: 73 -> 23 us)."""

    @T.macro
    def rows_block(block, x, weight, y, n):
        """Rows 8 block .. 8 block + 7."""
        total = T.alloc_buffer((LANES,), "float64")
        if n - block * LANES >= LANES:  # 8 rows side by side: lane j sums row j's squares in order
            total[T.Ramp(0, 1, LANES)] = T.Broadcast(T.float64(0), LANES)
            for c in range(hidden // LANES):
                squares = T.meta_var([_square(x, block * LANES + j, c) for j in range(LANES)])
                total[T.Ramp(0, 1, LANES)] = _add_columns(total[T.Ramp(0, 1, LANES)], squares)
            for i in range(hidden // LANES * LANES, hidden):
                for j in T.unroll(LANES):
                    r = T.meta_var(block * LANES + j)
                    total[j] = total[j] + T.Cast("float64", x[r, i] * x[r, i])
        else:
            for j in range(n - block * LANES):
                r = T.meta_var(block * LANES + j)
                total[j] = T.float64(0)
                for i in range(hidden):
                    total[j] = total[j] + T.Cast("float64", x[r, i] * x[r, i])
        for j in range(T.min(LANES, n - block * LANES)):
            r = T.meta_var(block * LANES + j)
            mean = T.meta_var(T.Cast("float32", total[j] / T.float64(hidden)))
            scale = T.meta_var(T.float32(1) / T.sqrt(mean + T.float32(eps)))
            for i in T.vectorized(hidden):
                y[r, i] = x[r, i] * scale * weight[i]

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_x: T.handle, weight: T.Buffer((hidden,), "float32"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, hidden), "float32")
        y = T.match_buffer(var_y, (n, hidden), "float32")
        each_row((n + LANES - 1) // LANES, rows_block, (x, weight, y, n))

    return kernel


@functools.cache
def swiglu_kernel(width: int) -> tirx.PrimFunc:
    """ggml_vec_swiglu_f32 per row: ggml_v_silu(g) * u in 8-wide vectors, x / (1 + expf(-x)) * u for the rest
    (element-wise, so a row split into spans gives the same values)."""
    vectors = width // LANES

    @T.macro
    def span(r, first, last, g, u, y):
        for v in range(first // LANES, T.min(last, vectors * LANES) // LANES):
            lanes = T.meta_var(T.Ramp(v * LANES, 1, LANES))
            gate = T.meta_var(g[r, lanes])
            zero = T.meta_var(T.Broadcast(T.float32(0), LANES))
            one = T.meta_var(T.Broadcast(T.float32(1), LANES))
            y[r, lanes] = gate / (one + v_expf(zero - gate, flush_tiny=True)) * u[r, lanes]  # 1 + tiny = 1
        for i in range(T.max(first, vectors * LANES), last):
            y[r, i] = g[r, i] / (T.float32(1) + T.exp(-g[r, i])) * u[r, i]

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_g: T.handle, var_u: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        g = T.match_buffer(var_g, (n, width), "float32")
        u = T.match_buffer(var_u, (n, width), "float32")
        y = T.match_buffer(var_y, (n, width), "float32")
        each_span(n, width, span, (g, u, y))

    return kernel


def _geglu(x: tirx.PrimExpr, up: tirx.PrimExpr, table: tirx.Buffer, lanes: int) -> tirx.PrimExpr:
    """GGML_GELU_FP16's gelu(x) * up for `lanes` elements: the table at x rounded to float16; 0 below -10,
    x * up above 10."""
    suffix = f"x{lanes}" if lanes > 1 else ""
    bits = tirx.reinterpret(f"uint16{suffix}", x.astype(f"float16{suffix}")).astype(f"int32{suffix}")
    gelu = tirx.BufferLoad(table, [bits]).astype(f"float32{suffix}")
    return tirx.Select(
        x <= splat(-10.0, lanes), splat(0.0, lanes), tirx.Select(x >= splat(10.0, lanes), x * up, gelu * up)
    )


@functools.cache
def geglu_kernel(width: int) -> tirx.PrimFunc:
    """ggml_vec_geglu_f32 per row (GGML_GELU_FP16): the float16 GeLU table at g rounded to float16, times u;
    0 below -10, g * u above 10. 8 elements at a time (1 thread, 128 x 2048: 270 -> 148 us)."""
    vectors = width // LANES

    @T.macro
    def span(r, first, last, g, u, table, y):
        for v in range(first // LANES, T.min(last, vectors * LANES) // LANES):
            lanes = T.meta_var(T.Ramp(v * LANES, 1, LANES))
            y[r, lanes] = _geglu(g[r, lanes], u[r, lanes], table, LANES)
        for i in range(T.max(first, vectors * LANES), last):
            y[r, i] = _geglu(g[r, i], u[r, i], table, 1)

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_g: T.handle, var_u: T.handle, table: T.Buffer((1 << 16,), "float16"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        g = T.match_buffer(var_g, (n, width), "float32")
        u = T.match_buffer(var_u, (n, width), "float32")
        y = T.match_buffer(var_y, (n, width), "float32")
        each_span(n, width, span, (g, u, table, y))

    return kernel


def _rows_op(kernel: tirx.PrimFunc, name: str, inputs: list[Tensor], like: Tensor) -> Tensor:
    """Run a row-wise kernel on [..., width] tensors flattened to rows; the result has `like`'s shape."""
    width = like.shape[-1]
    rows = [op.reshape(t, (-1, width)) if t.ndim != 1 else t for t in inputs]
    out = Tensor.placeholder([rows[0].shape[0], width], "float32")
    return op.reshape(op.tensor_ir_op(kernel, name, rows, out), like.shape)


class LlamaCppRMSNorm(nn.Module):
    """nn.RMSNorm (no bias) computed as llama.cpp does; the same `weight` parameter."""

    def __init__(self, hidden: int, eps: float):
        self.hidden, self.eps = hidden, eps
        self.weight = nn.Parameter((hidden,), "float32")

    def forward(self, x: Tensor) -> Tensor:
        return _rows_op(rms_norm_kernel(self.hidden, float(self.eps)), "rms_norm_llamacpp", [x, self.weight], x)


class LlamaCppSwiGLU(nn.Module):
    """silu(gate) * up computed as llama.cpp's fused swiglu does."""

    def forward(self, gate: Tensor, up: Tensor) -> Tensor:
        return _rows_op(swiglu_kernel(int(gate.shape[-1])), "swiglu_llamacpp", [gate, up], gate)


class LlamaCppGeGLU(nn.Module):
    """gelu_tanh(gate) * up computed as llama.cpp's fused geglu does."""

    def forward(self, gate: Tensor, up: Tensor) -> Tensor:
        table = Tensor.from_const(gelu_f16_table())  # 128 KB, a constant of the compiled library
        return _rows_op(geglu_kernel(int(gate.shape[-1])), "geglu_llamacpp", [gate, up, table], gate)
