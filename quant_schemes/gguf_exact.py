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
- GeGLU: ggml's table of GeLU-tanh at every float16 (libm's tanhf, rounded to float16; a constant of the
  compiled library) at x rounded to float16, times u; 0 below -10 and x * u above 10.
- RoPE applied by the model (rotate-half, "NEOX"): ggml's angle cache (position times powf(base, -2 / d)
  once per pair, libm's cosf and sinf) and its rotation as GCC contracts it.

The float operations here use explicit fused multiply-adds where ggml has them and plain ones elsewhere:
TVM's LLVM backend fuses a * b + c on its own (it allows FP contraction), which must not happen where ggml
rounds twice, so no kernel here leaves a multiply feeding an add.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T

from quant_schemes.gguf_int8 import (
    CHUNK,
    LANE_ACTIVATION_BYTES,
    LANE_ROWS,
    STREAM_AHEAD,
    TASKS,
    TOKENS,
    _intrin,
    _prefetch,
    interleave_rows,
    row_group_blocks,
)
from quant_schemes.vector_exprs import concat

Q = GGMLQuantizationType
# Block types whose llama.cpp AVX2 matmul this module (or gguf_exact_kquants.py) reproduces (Q4_0 is repacked by
# llama.cpp into kernels of another order).
EXACT_TYPES = {Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K}
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


def lane_sum(v: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """hsum_float_8's order across 8 vectors (lane m of each row in v[m]): ((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7))."""
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))


@T.macro
def store_rows(y, t, g, n_out: int, result, spill, at):
    """y[t, g*8 .. g*8+7] = result (float32x8), rows past n_out dropped: those go through spill[at .. at+8]."""
    if g * LANE_ROWS + LANE_ROWS <= n_out:
        y[t, T.Ramp(g * LANE_ROWS, 1, LANE_ROWS)] = result
    else:
        spill[T.Ramp(at, 1, LANE_ROWS)] = result
        for r in range(LANE_ROWS):
            if g * LANE_ROWS + r < n_out:
                y[t, g * LANE_ROWS + r] = spill[at + r]


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


@dataclass(frozen=True)
class GroupLayout:
    """Byte offsets in a chunk of 8 rows stored side by side (8 * block bytes): the rows' float16 scales, their
    float16 mins (Q4_1), Q5_0's high-bit plane (byte 4r + k: bit m is column 4m + k of row r), then 8 words of
    32 bytes, word m holding the 8 rows' columns 4m..4m+3 (for Q4_1 and Q5_0 packed two words to a byte, word
    m and m + 4, as gguf_int8.InterleavedLayout stores them)."""

    block_bytes: int
    minimum: int | None
    codes: int
    high: int | None = None

    @property
    def group_bytes(self) -> int:
        return LANE_ROWS * self.block_bytes


GROUP_LAYOUTS = {
    Q.Q4_1: GroupLayout(20, 16, 32),
    Q.Q5_0: GroupLayout(22, None, 48, high=16),
    Q.Q8_0: GroupLayout(34, None, 16),
}


def group_bytes(qtype: GGMLQuantizationType, n_in: int) -> int:
    """Bytes of one group of 8 rows of `n_in` columns as `group_rows` stores them."""
    from quant_schemes.gguf_exact_kquants import LAYOUTS, SUPER

    if qtype in LAYOUTS:
        return n_in // SUPER * LAYOUTS[qtype].size
    return n_in // CHUNK * GROUP_LAYOUTS[qtype].group_bytes


def group_rows(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """GGUF rows [n_out, row_bytes] -> [ceil(n_out / 8), group_bytes] in the GroupLayout (rows past n_out are
    zero): the same bits, reordered, so one 32-byte load holds one word of 8 rows (K-quants: `group_rows_k`)."""
    from quant_schemes.gguf_exact_kquants import LAYOUTS, group_rows_k

    if qtype in LAYOUTS:
        return group_rows_k(raw, qtype)
    if qtype in (Q.Q4_1, Q.Q5_0):
        return interleave_rows(raw, qtype)
    blocks = row_group_blocks(raw, GROUP_LAYOUTS[qtype].block_bytes)  # [G, C, 8, bb]
    groups, chunks = blocks.shape[:2]
    words = blocks[..., 2:].reshape(groups, chunks, LANE_ROWS, 8, 4).transpose(0, 1, 3, 2, 4)  # [G, C, m, r, 4]
    parts = [blocks[..., 0:2].reshape(groups, chunks, -1), words.reshape(groups, chunks, -1)]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(groups, -1))


QUAD = 4  # tokens that share each decoded word of the weights


def _u8(value: int | tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.const(value, "uint8") if isinstance(value, int) else value.astype("uint8")


def u8x32(value: int) -> tirx.PrimExpr:
    """`value` in all 32 lanes of a uint8 vector (masks and shifts of packed codes)."""
    return tirx.Broadcast(tirx.const(value, "uint8"), 32)


@functools.cache
def exact_matmul(qtype: GGMLQuantizationType, n_in: int, n_out: int, vnni: bool = False) -> tirx.PrimFunc:
    """y[t, o] = sum_k x[t, k] * W[o, k] exactly as llama.cpp's AVX2 build computes it, W in `group_rows` form.

    llama.cpp keeps 8 float accumulators per row, lane m summing columns 4m..4m+3 of every block; here 8 rows
    go side by side, so accumulator m holds lane m of 8 rows and each vector operation is, lane for lane, the
    operation llama.cpp does for that row: the same results, with 8 rows' work in one instruction and the
    weights read as one stream. K-quants: `kquant_matmul`. `vnni`: each word's integer sums in one `vpdpbusd`
    instead of `pmaddubsw` + `pmaddwd` (the same integers: no pair of products here reaches int16's limit).
    """
    from quant_schemes.gguf_exact_kquants import LAYOUTS, kquant_matmul

    if qtype in LAYOUTS:
        return kquant_matmul(qtype, n_in, n_out)
    lay = GROUP_LAYOUTS[qtype]
    chunks = n_in // CHUNK
    row_groups = -(-n_out // LANE_ROWS)
    tasks = min(TASKS, row_groups)
    groups_per_task = -(-row_groups // tasks)
    gb = lay.group_bytes
    block_tokens = max(TOKENS, LANE_ACTIVATION_BYTES // n_in)  # tokens that pass over a row group at a time
    ones = tirx.Broadcast(tirx.const(1, "int16"), 16)
    zeros = tirx.Broadcast(tirx.const(0, "int32"), LANE_ROWS)

    def halves(data, g, c, at: int) -> tirx.PrimExpr:
        """8 float16 values of chunk c (the rows' scales or mins) as float32x8."""
        raw = tirx.BufferLoad(data, [g, tirx.Ramp(c * gb + at, 1, 16)])
        return tirx.reinterpret("float16x8", raw).astype("float32x8")

    def weight_word(data, g, c, m) -> tuple[tirx.PrimExpr, tirx.PrimExpr | None]:
        """Word m of chunk c for 8 rows as pmaddubsw's unsigned operand, and for signed codes the codes whose
        signs the activations take (|w| times x carrying w's sign, as llama.cpp). m: an int, or a loop variable
        that unrolling makes one."""
        if qtype in (Q.Q4_1, Q.Q5_0):  # words m and m + 4 are the low and high nibbles of the same bytes
            packed = tirx.BufferLoad(data, [g, tirx.Ramp(c * gb + lay.codes + 32 * (m % 4), 1, 32)])
            codes = (packed >> tirx.Broadcast(_u8(m // 4 * 4), 32)) & u8x32(15)
            if qtype == Q.Q4_1:
                return codes, None
            plane = tirx.BufferLoad(data, [g, tirx.Ramp(c * gb + lay.high, 1, 32)])
            high = ((plane >> tirx.Broadcast(_u8(m), 32)) & u8x32(1)) << u8x32(4)
            raw = (codes | high) - u8x32(16)  # Q5_0: nibble | bit 4, less 16
        else:
            raw = tirx.BufferLoad(data, [g, tirx.Ramp(c * gb + lay.codes + 32 * m, 1, 32)])
        signed = tirx.reinterpret("int8x32", raw)
        magnitude = tirx.reinterpret("uint8x32", _intrin("int8x32", "llvm.abs.v32i8", signed, tirx.const(0, "bool")))
        return magnitude, signed

    def word_sums(data, g, c, m, xq, t) -> tirx.PrimExpr:
        """int32x8: each row's sum of columns 4m..4m+3 of chunk c times token t's int8 activations there."""
        x4 = tirx.reinterpret("int32", tirx.BufferLoad(xq, [t, tirx.Ramp(c * CHUNK + 4 * m, 1, 4)]))
        xb = tirx.reinterpret("int8x32", tirx.Broadcast(x4, LANE_ROWS))
        operand, signs = weight_word(data, g, c, m)
        if signs is not None:
            xb = _intrin("int8x32", "llvm.x86.avx2.psign.b", xb, signs)
        if vnni:
            return _intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", zeros, operand, xb)
        pairs = _intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", operand, xb)
        return _intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, ones)

    def rows(buf, at) -> tirx.PrimExpr:
        return tirx.BufferLoad(buf, [tirx.Ramp(at, 1, LANE_ROWS)])

    def chunk_sums(data, g, c, xq, t) -> tirx.PrimExpr:
        """float32x64: words 0..7 of chunk c, each 8 rows' integer sums (the rows' lane m) as floats."""
        return concat([word_sums(data, g, c, m, xq, t).astype("float32x8") for m in range(8)])

    def chunk_scale(data, g, c, x_scale, t) -> tirx.PrimExpr:
        """float32x64: each row's d_w * d_x for chunk c, for all 8 words."""
        return concat([halves(data, g, c, 0) * tirx.Broadcast(x_scale[t, c], LANE_ROWS)] * 8)

    @T.macro
    def group_times_token(y, data, xq, x_scale, x_sum, g, t, acc):
        """y[t, g*8 .. g*8+7] for one token (decode, and a block's last n % 4): all 8 words of a chunk at
        once, lane m's accumulator of 8 rows at acc[8m], the mins' sums at acc[64]: 8 independent chains."""
        acc[T.Ramp(0, 1, 9 * LANE_ROWS)] = T.Broadcast(T.float32(0), 9 * LANE_ROWS)
        for c in range(chunks):
            for line in range((gb + 63) // 64):
                T.evaluate(_prefetch(data, g, c * gb + STREAM_AHEAD + line * 64))
            acc[T.Ramp(0, 1, 64)] = fma(
                chunk_scale(data, g, c, x_scale, t), chunk_sums(data, g, c, xq, t), acc[T.Ramp(0, 1, 64)]
            )
            if lay.minimum is not None:
                acc[T.Ramp(64, 1, LANE_ROWS)] = fma(
                    halves(data, g, c, lay.minimum),
                    T.Broadcast(x_sum[t, c], LANE_ROWS),
                    acc[T.Ramp(64, 1, LANE_ROWS)],
                )
        total = T.meta_var(lane_sum([acc[T.Ramp(8 * m, 1, LANE_ROWS)] for m in range(8)]))
        result = T.meta_var(total + acc[T.Ramp(64, 1, LANE_ROWS)] if lay.minimum is not None else total)
        store_rows(y, t, g, n_out, result, acc, 0)

    @T.macro
    def group_times_tokens(y, data, xq, x_scale, x_sum, g, t0, count, acc, scales):
        """y[t0 .. t0+count, g*8 .. g*8+7] (rows past n_out not stored). llama.cpp keeps, per row and token, 8
        float accumulators (lane m sums columns 4m..4m+3 of every block) and the min terms; here word m is
        one pass over the chunks in which each of the `count` tokens' lane-m accumulators of 8 rows takes
        each chunk in turn, so a word's codes are decoded once for all tokens. acc: [count, 9, 8] (lanes,
        then mins), scales: [count, chunks, 8] the rows' d_w * d_x. The first pass asks for the weights
        STREAM_AHEAD bytes on."""
        for i in T.unroll(count):
            for c in range(chunks):
                scales[T.Ramp((i * chunks + c) * LANE_ROWS, 1, LANE_ROWS)] = halves(data, g, c, 0) * T.Broadcast(
                    x_scale[t0 + i, c], LANE_ROWS
                )
        for m in T.unroll(8):
            for i in T.unroll(count):
                acc[T.Ramp((i * 9 + m) * LANE_ROWS, 1, LANE_ROWS)] = T.Broadcast(T.float32(0), LANE_ROWS)
            for c in range(chunks):
                if m == 0:
                    for line in T.unroll((gb + 63) // 64):
                        T.evaluate(_prefetch(data, g, c * gb + STREAM_AHEAD + line * 64))
                for i in T.unroll(count):
                    acc[T.Ramp((i * 9 + m) * LANE_ROWS, 1, LANE_ROWS)] = fma(
                        rows(scales, (i * chunks + c) * LANE_ROWS),
                        word_sums(data, g, c, m, xq, t0 + i).astype("float32x8"),
                        rows(acc, (i * 9 + m) * LANE_ROWS),
                    )
        for i in T.unroll(count):
            acc[T.Ramp((i * 9 + 8) * LANE_ROWS, 1, LANE_ROWS)] = T.Broadcast(T.float32(0), LANE_ROWS)
            if lay.minimum is not None:
                for c in range(chunks):
                    acc[T.Ramp((i * 9 + 8) * LANE_ROWS, 1, LANE_ROWS)] = fma(
                        halves(data, g, c, lay.minimum),
                        T.Broadcast(x_sum[t0 + i, c], LANE_ROWS),
                        rows(acc, (i * 9 + 8) * LANE_ROWS),
                    )
            # hsum_float_8 for each row, then the mins.
            total = T.meta_var(lane_sum([rows(acc, (i * 9 + m) * LANE_ROWS) for m in range(8)]))
            result = T.meta_var(total + rows(acc, (i * 9 + 8) * LANE_ROWS) if lay.minimum is not None else total)
            store_rows(y, t0 + i, g, n_out, result, acc, (i * 9 + 8) * LANE_ROWS)

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_x: T.handle, data: T.Buffer((row_groups, chunks * gb), "uint8"), var_y: T.handle):
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
        # Row groups in `tasks` parallel ranges; tokens `block_tokens` at a time (their activations stay in L2)
        # pass over each group in fours, the first four streaming its weights in.
        for task in T.parallel(tasks):
            acc = T.alloc_buffer((QUAD * 9 * LANE_ROWS,), "float32", scope="local")
            single = T.alloc_buffer((9 * LANE_ROWS,), "float32", scope="local")
            scales = T.alloc_buffer((QUAD * chunks * LANE_ROWS,), "float32", scope="local")
            for tb in range((n + block_tokens - 1) // block_tokens):
                for gi in range(groups_per_task):
                    if task * groups_per_task + gi < row_groups:
                        g = T.meta_var(task * groups_per_task + gi)
                        first = T.meta_var(tb * block_tokens)
                        count = T.meta_var(T.min(n, first + block_tokens) - first)
                        for q in range(count // QUAD):
                            group_times_tokens(y, data, xq, x_scale, x_sum, g, first + q * QUAD, QUAD, acc, scales)
                        for r in range(count % QUAD):
                            group_times_token(y, data, xq, x_scale, x_sum, g, first + count // QUAD * QUAD + r, single)

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


# ggml_gelu_f32's constants (GELU_COEF_A, SQRT_2_OVER_PI) as float32.
GELU_COEF_A = float(np.float32(0.044715))
SQRT_2_OVER_PI = float(np.float32(0.79788456080286535587989211986876))


@functools.cache
def _libm() -> ctypes.CDLL:
    """The C library's float functions ggml calls (tanhf, powf), for values computed at compile time."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.tanhf.restype, libm.tanhf.argtypes = ctypes.c_float, [ctypes.c_float]
    libm.powf.restype, libm.powf.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]
    return libm


@functools.cache
def gelu_f16_table() -> np.ndarray:
    """ggml_table_gelu_f16 as float16 [65536]: ggml_gelu_f32 (1 + a*x*x fused, as GCC compiles it; libm's
    tanhf) of every float16, rounded to float16 (NaNs as F16C makes them: no payload, the sign kept)."""
    libm = _libm()
    f32 = np.float32
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(f32)
    with np.errstate(all="ignore"):
        inner = ((f32(GELU_COEF_A) * x).astype(np.float64) * x + 1.0).astype(f32)  # exact product, one rounding
        arg = ((f32(SQRT_2_OVER_PI) * x).astype(f32) * inner).astype(f32)
        tanh = np.array([libm.tanhf(float(a)) for a in arg], f32)
        out = ((f32(0.5) * x).astype(f32) * (f32(1) + tanh).astype(f32)).astype(f32)
    bits = out.astype(np.float16).view(np.uint16)
    bits = np.where(np.isnan(out), np.where(np.signbit(out), 0xFE00, 0x7E00), bits).astype(np.uint16)
    return bits.view(np.float16)


@functools.cache
def geglu_kernel(width: int) -> tirx.PrimFunc:
    """ggml_vec_geglu_f32 per row (GGML_GELU_FP16): the float16 GeLU table at g rounded to float16, times u;
    0 below -10, g * u above 10."""

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_g: T.handle, var_u: T.handle, table: T.Buffer((1 << 16,), "float16"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        g = T.match_buffer(var_g, (n, width), "float32")
        u = T.match_buffer(var_u, (n, width), "float32")
        y = T.match_buffer(var_y, (n, width), "float32")
        for r in T.parallel(n):
            for i in range(width):
                x = T.meta_var(g[r, i])
                gelu = T.meta_var(table[T.Cast("int32", T.reinterpret("uint16", T.Cast("float16", x)))])
                y[r, i] = T.Select(
                    x <= T.float32(-10),
                    T.float32(0),
                    T.Select(x >= T.float32(10), x * u[r, i], T.Cast("float32", gelu) * u[r, i]),
                )

    return kernel


def ggml_theta_scale(theta: float, rotary_dim: int) -> float:
    """powf(theta, -2.0f / n_dims) from the C library, as ggml computes it."""
    exponent = float(np.float32(-2.0) / np.float32(rotary_dim))
    return float(_libm().powf(theta, exponent))


@T.macro
def ggml_rope_cache(cos, sin, angle, position, half: int, theta_scale: float):
    """ggml_rope_cache_init into local buffers cos, sin [half]: theta = position, then theta *= theta_scale
    pair by pair (angle [1]: its running value), libm's cosf and sinf."""
    angle[0] = T.Cast("float32", position)
    for i in range(half):
        cos[i] = T.cos(angle[0])
        sin[i] = T.sin(angle[0])
        angle[0] = angle[0] * T.float32(theta_scale)


@functools.cache
def neox_rope_kernel(heads: int, dim: int, theta: float) -> tirx.PrimFunc:
    """ggml_rope_ext (NEOX) of x [n, heads, dim] at positions [n]: ggml_rope_cache_init's angles (theta
    multiplied by powf(base, -2 / dim) pair by pair, cosf and sinf), rotate_pairs as GCC contracts it."""
    half = dim // 2
    theta_scale = ggml_theta_scale(theta, dim)

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_x: T.handle, var_pos: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, heads, dim), "float32")
        pos = T.match_buffer(var_pos, (n,), "int32")
        y = T.match_buffer(var_y, (n, heads, dim), "float32")
        for t in T.parallel(n):
            cos = T.alloc_buffer((half,), "float32", scope="local")
            sin = T.alloc_buffer((half,), "float32", scope="local")
            angle = T.alloc_buffer((1,), "float32", scope="local")
            ggml_rope_cache(cos, sin, angle, pos[t], half, theta_scale)
            for h in range(heads):
                for i in T.vectorized(half):
                    y[t, h, i] = fma(x[t, h, i], cos[i], -(x[t, h, i + half] * sin[i]))
                    y[t, h, i + half] = fma(x[t, h, i], sin[i], x[t, h, i + half] * cos[i])

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


class LlamaCppNeoxRope(nn.Module):
    """model_defs.common.NeoxRope computed as llama.cpp does."""

    def __init__(self, theta: float, head_dim: int):
        self.theta, self.head_dim = theta, head_dim

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        b, s, heads, dim = x.shape
        rows = op.reshape(x, (-1, heads, dim))
        out = Tensor.placeholder(list(rows.shape), "float32")
        kernel = neox_rope_kernel(int(heads), int(dim), float(self.theta))
        return op.reshape(op.tensor_ir_op(kernel, "rope_llamacpp", [rows, positions], out), x.shape)
