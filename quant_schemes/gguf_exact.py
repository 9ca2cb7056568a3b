"""llama.cpp's own float arithmetic on x86 CPUs with AVX2, op for op, so that a GGUF model's logits are the
very numbers llama.cpp computes (not just close: a greedy continuation follows llama.cpp's token for token).

Near-ties decide greedy text, and llama.cpp's 8-bit activations amplify any rounding difference: two builds
that differ only in summation order part within a few tokens (llama.cpp against itself with flash attention
on and off: after 14, 2 and 2 tokens on SmolLM2). So these kernels reproduce ggml's CPU code (the version
llama-cpp-python 0.3.36 vendors) including its order of float operations and where it fuses multiply-adds:

- matmuls (`ggml_vec_dot_q4_1_q8_1`, `..._q8_0_q8_0`, tinyBLAS for Q8_0): activations quantized per 32
  columns with scale max/127 (stored as float16) and multiplier 127/max, rounded half to even; per block,
  8 int32 sums of 4 columns each are scaled by d_w * d_x and fused into 8 float accumulators; the 8 lanes
  are summed as `hsum_float_8` does, then the blocks' min terms (summed with fused multiply-adds) added.
- RMSNorm: the sum of squares in float64, one element at a time.
- SwiGLU: silu(g) * u with ggml's vector exp (`ggml_v_expf`), libm's expf for a row's last n % 8 elements.

The float operations here use explicit fused multiply-adds where ggml has them and plain ones elsewhere:
TVM's LLVM backend fuses a * b + c on its own (it allows FP contraction), which must not happen where ggml
rounds twice, so no kernel here leaves a multiply feeding an add.
"""

from __future__ import annotations

import functools

from gguf import GGMLQuantizationType
from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T

from quant_schemes.gguf_int8 import CHUNK, CHUNK_DECODERS, TASKS, TOKENS, Chunk, _prefetch, chunk_dot

Q = GGMLQuantizationType
# Block types whose llama.cpp AVX2 dot product this module reproduces (Q4_0 is repacked by llama.cpp, K-quants
# go through its tiled kernels: their summation orders differ).
EXACT_TYPES = {Q.Q4_1, Q.Q8_0}
_WITH_MIN = {Q.Q4_1}
LANES = 8


def fma(a: tirx.PrimExpr, b: tirx.PrimExpr, c: tirx.PrimExpr) -> tirx.PrimExpr:
    """a * b + c rounded once (scalar or float32 vector)."""
    lanes = c.ty.dtype.lanes
    name, dtype = ("llvm.fma.f32", "float32") if lanes == 1 else (f"llvm.fma.v{lanes}f32", f"float32x{lanes}")
    return tirx.call_llvm_pure_intrin(dtype, name, a, b, c)


def _lanes(v: tirx.PrimExpr, first: int, count: int) -> tirx.PrimExpr:
    if count == 1:
        return tirx.Shuffle([v], [tirx.IntImm("int32", first)])
    return tirx.Shuffle([v], [tirx.IntImm("int32", first + i) for i in range(count)])


def hsum8(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """ggml's `hsum_float_8` (and tinyBLAS's hsum): ((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7))."""
    r = _lanes(v, 4, 4) + _lanes(v, 0, 4)
    s = _lanes(r, 0, 2) + _lanes(r, 2, 2)
    return _lanes(s, 0, 1) + _lanes(s, 1, 1)


def _splat(value, lanes: int, dtype: str = "float32") -> tirx.PrimExpr:
    scalar = tirx.const(value, dtype) if isinstance(value, (int, float)) else value
    return scalar if lanes == 1 else tirx.Broadcast(scalar, lanes)


def v_expf(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """ggml's AVX2 `ggml_v_expf`, lane by lane (its special cases for |n| > 126 included)."""
    lanes = x.ty.dtype.lanes
    f32 = "float32" if lanes == 1 else f"float32x{lanes}"
    u32 = "uint32" if lanes == 1 else f"uint32x{lanes}"

    def c(value: str) -> tirx.PrimExpr:
        return _splat(float.fromhex(value), lanes)

    def bits(v):
        return tirx.reinterpret(u32, v)

    def flt(v):
        return tirx.reinterpret(f32, v)

    def u(value: int):
        return _splat(value, lanes, "uint32")

    r = c("0x1.8p23")
    z = fma(x, c("0x1.715476p+0"), r)
    n = z - r
    b = fma(-n, c("0x1.7f7d1cp-20"), fma(-n, c("0x1.62e4p-1"), x))
    e = bits(z) << u(23)
    k = flt(e + bits(_splat(1.0, lanes)))
    big = tirx.abs(n) > _splat(126.0, lanes)
    sq = b * b
    j = fma(
        fma(fma(c("0x1.0e4020p-7"), b, c("0x1.573e2ep-5")), sq, fma(c("0x1.555e66p-3"), b, c("0x1.fffdb6p-2"))),
        sq,
        c("0x1.ffffecp-1") * b,
    )
    # ggml: g = n <= 0 ? 0x82000000 : 0, s1 = g + 0x7f000000, s2 = e - g (as bits, wrapping), written as
    # selects: TVM's simplifier folds g + 0x7f000000 without wrapping to 32 bits.
    negative = n <= _splat(0.0, lanes)
    s1 = tirx.Select(negative, _splat(2.0**-125, lanes), _splat(2.0**127, lanes))
    s2 = tirx.Select(negative, flt(e + u(0x7E000000)), flt(e))
    huge = tirx.abs(n) > _splat(192.0, lanes)
    return tirx.Select(huge, s1 * s1, tirx.Select(big, fma(s2, j, s2) * s1, fma(k, j, k)))


def _f16_round(x: tirx.PrimExpr) -> tirx.PrimExpr:
    lanes = x.ty.dtype.lanes
    half = "float16" if lanes == 1 else f"float16x{lanes}"
    return x.astype(half).astype(x.ty.dtype)


@functools.cache
def exact_matmul(qtype: GGMLQuantizationType, n_in: int, n_out: int, row_bytes: int) -> tirx.PrimFunc:
    """y[t, o] = sum_k x[t, k] * W[o, k] exactly as llama.cpp's AVX2 build computes it (W in GGUF blocks)."""
    decode = CHUNK_DECODERS[qtype]
    chunks = n_in // CHUNK
    rows_per_task = -(-n_out // TASKS)
    lines_per_row = -(-row_bytes // 64)
    with_min = qtype in _WITH_MIN

    @T.macro
    def row_times_tokens(y, data, xq, x_scale, x_sum, o, t0, tokens, acc, mins, codes, slot):
        """y[t0 : t0 + tokens, o] with task `slot`'s accumulators; a weight row's chunk is decoded once for
        all the tokens."""
        for u in T.unroll(tokens):
            acc[slot * TOKENS + u, T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
            mins[slot * TOKENS + u] = T.float32(0)
        for c in range(chunks):
            ch = T.meta_var(decode(data, o, c))
            codes[slot, T.Ramp(0, 1, CHUNK)] = ch.codes
            local = T.meta_var(Chunk(codes[slot, T.Ramp(0, 1, CHUNK)], ch.scale, ch.zero))
            for u in T.unroll(tokens):
                xv = T.meta_var(xq[t0 + u, T.Ramp(c * CHUNK, 1, CHUNK)])
                sums = T.meta_var(chunk_dot(local, xv).astype(f"float32x{LANES}"))
                scale = T.meta_var(T.Broadcast(ch.scale * x_scale[t0 + u, c], LANES))
                lanes = T.meta_var(T.Ramp(0, 1, LANES))
                acc[slot * TOKENS + u, lanes] = fma(scale, sums, acc[slot * TOKENS + u, lanes])
                if with_min:
                    mins[slot * TOKENS + u] = fma(ch.offset, x_sum[t0 + u, c], mins[slot * TOKENS + u])
        for u in T.unroll(tokens):
            y[t0 + u, o] = hsum8(acc[slot * TOKENS + u, T.Ramp(0, 1, LANES)]) + mins[slot * TOKENS + u]

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_x: T.handle, data: T.Buffer((n_out, row_bytes), "uint8"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, n_in), "float32")
        y = T.match_buffer(var_y, (n, n_out), "float32")
        xq = T.alloc_buffer((n, n_in), "int8")
        x_scale = T.alloc_buffer((n, chunks), "float32")  # float16 d of the block, as float32
        x_sum = T.alloc_buffer((n, chunks), "float32")  # float16 d * sum(q) (Q8_1's s)
        # quantize_row_q8_0 / q8_1: d = max|x| / 127, q = round_half_even(x * (127 / max|x|)).
        for t in T.parallel(n):
            for c in range(chunks):
                amax = T.alloc_buffer((1,), "float32", scope="local")
                total = T.alloc_buffer((1,), "int32", scope="local")
                amax[0] = T.float32(0)
                for i in range(CHUNK):
                    amax[0] = T.max(amax[0], T.fabs(x[t, c * CHUNK + i]))
                d = T.meta_var(amax[0] / T.float32(127))
                inv = T.meta_var(T.if_then_else(amax[0] != T.float32(0), T.float32(127) / amax[0], T.float32(0)))
                total[0] = 0
                for i in range(CHUNK):
                    xq[t, c * CHUNK + i] = T.Cast("int8", T.nearbyint(x[t, c * CHUNK + i] * inv))
                    total[0] = total[0] + T.Cast("int32", xq[t, c * CHUNK + i])
                x_scale[t, c] = _f16_round(d)
                x_sum[t, c] = _f16_round(d * T.Cast("float32", total[0]))
        # Rows in TASKS parallel ranges; tokens TOKENS at a time (the last tile ends at the last token,
        # overlapping the one before: each token's sums are computed alone, so recomputing is harmless).
        acc = T.alloc_buffer((TASKS * TOKENS, LANES), "float32")
        mins = T.alloc_buffer((TASKS * TOKENS,), "float32")
        codes = T.alloc_buffer((TASKS, CHUNK), "uint8")
        for task in T.parallel(TASKS):
            for i in range(rows_per_task):
                if task * rows_per_task + i < n_out:
                    o = T.meta_var(task * rows_per_task + i)
                    if o + 4 < n_out:
                        for line in range(lines_per_row):
                            T.evaluate(_prefetch(data, o + 4, line * 64))
                    if n >= TOKENS:
                        for tile in range((n + TOKENS - 1) // TOKENS):
                            t0 = T.meta_var(T.min(tile * TOKENS, n - TOKENS))
                            row_times_tokens(y, data, xq, x_scale, x_sum, o, t0, TOKENS, acc, mins, codes, task)
                    else:
                        for t in range(n):
                            row_times_tokens(y, data, xq, x_scale, x_sum, o, t, 1, acc, mins, codes, task)

    return kernel


@functools.cache
def rms_norm_kernel(hidden: int, eps: float) -> tirx.PrimFunc:
    """ggml_rms_norm + ggml_mul: sum of squares in float64 in order, scale = 1 / sqrtf(mean + eps)."""

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_x: T.handle, weight: T.Buffer((hidden,), "float32"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, hidden), "float32")
        y = T.match_buffer(var_y, (n, hidden), "float32")
        for r in T.parallel(n):
            total = T.alloc_buffer((1,), "float64", scope="local")
            total[0] = T.float64(0)
            for i in range(hidden):
                total[0] = total[0] + T.Cast("float64", x[r, i] * x[r, i])
            mean = T.meta_var(T.Cast("float32", total[0] / T.float64(hidden)))
            scale = T.meta_var(T.float32(1) / T.sqrt(mean + T.float32(eps)))
            for i in T.vectorized(hidden):
                y[r, i] = x[r, i] * scale * weight[i]

    return kernel


@functools.cache
def swiglu_kernel(width: int) -> tirx.PrimFunc:
    """ggml_vec_swiglu_f32 per row: ggml_v_silu(g) * u in 8-wide vectors, x / (1 + expf(-x)) * u for the rest."""
    vectors = width // LANES

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_g: T.handle, var_u: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        g = T.match_buffer(var_g, (n, width), "float32")
        u = T.match_buffer(var_u, (n, width), "float32")
        y = T.match_buffer(var_y, (n, width), "float32")
        for r in T.parallel(n):
            for v in range(vectors):
                lanes = T.meta_var(T.Ramp(v * LANES, 1, LANES))
                gate = T.meta_var(g[r, lanes])
                zero = T.meta_var(T.Broadcast(T.float32(0), LANES))
                one = T.meta_var(T.Broadcast(T.float32(1), LANES))
                y[r, lanes] = gate / (one + v_expf(zero - gate)) * u[r, lanes]
            for i in range(vectors * LANES, width):
                y[r, i] = g[r, i] / (T.float32(1) + T.exp(-g[r, i])) * u[r, i]

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
