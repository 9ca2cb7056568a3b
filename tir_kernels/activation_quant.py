"""Activations quantized to int8 for the integer matmuls (tir_kernels/matmul_*.py), each token in parallel.

Three forms, as their kernels multiply them: mlcc's (Q8_0/Q8_1-like blocks of 32, or Q8_K-like blocks of 256
for super-block weights, rounded half away from zero) and llama.cpp's own `quantize_row_q8_0`/`q8_1` (blocks of
32) and `quantize_row_q8_K` (blocks of 256), both rounded half to even.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from tir_kernels.gguf_blocks import CHUNK, SUPER_BLOCK
from tir_kernels.simd import each_row, f16_round, lanes_of

PIECE = 16  # floats per vector operation (AVX-512; LLVM splits them where vectors are narrower)


def _piece(x: tirx.Buffer, t, at) -> tirx.PrimExpr:
    return tirx.BufferLoad(x, [t, tirx.Ramp(at, 1, PIECE)])


def _fold(v: tirx.PrimExpr, combine) -> tirx.PrimExpr:
    """A vector's lanes combined pairwise (max, or an integer sum: exact, so any order gives the same)."""
    while v.ty.dtype.lanes > 1:
        half = v.ty.dtype.lanes // 2
        v = combine(lanes_of(v, 0, half), lanes_of(v, half, half))
    return v


def _absmax(x: tirx.Buffer, t, start, width: int) -> tirx.PrimExpr:
    """max |x[t, start : start + width]| (a maximum: the same in any order)."""
    pieces = [tirx.abs(_piece(x, t, start + i)) for i in range(0, width, PIECE)]
    while len(pieces) > 1:
        pieces = [tirx.max(a, b) for a, b in zip(pieces[0::2], pieces[1::2])] + pieces[len(pieces) // 2 * 2 :]
    return _fold(pieces[0], tirx.max)


def _codes(x: tirx.Buffer, t, at, multiplier: tirx.PrimExpr, rounding) -> tirx.PrimExpr:
    """int8x16: x[t, at ..] times `multiplier`, rounded (`tirx.round`: half away from zero; `tirx.nearbyint`:
    half to even)."""
    return rounding(_piece(x, t, at) * tirx.Broadcast(multiplier, PIECE)).astype(f"int8x{PIECE}")


def _code_sum(xq: tirx.Buffer, t, start, width: int) -> tirx.PrimExpr:
    """int32: the sum of xq[t, start : start + width]."""
    pieces = [tirx.BufferLoad(xq, [t, tirx.Ramp(start + i, 1, PIECE)]).astype(f"int32x{PIECE}")
              for i in range(0, width, PIECE)]  # fmt: skip
    total = pieces[0]
    for piece in pieces[1:]:
        total = total + piece
    return _fold(total, lambda a, b: a + b)


def _mlcc_scale(amax: tirx.PrimExpr, super_block: bool) -> tirx.PrimExpr:
    if super_block:
        return tirx.const(1, "float32") / (tirx.const(127, "float32") / amax)
    return (amax / tirx.const(127, "float32")).astype("float16").astype("float32")


def _llamacpp_multiplier(amax: tirx.PrimExpr) -> tirx.PrimExpr:
    """127 / max|x|, 0 for a block of zeros."""
    zero = tirx.const(0, "float32")
    return tirx.if_then_else(amax != zero, tirx.const(127, "float32") / amax, zero)


@T.macro
def _quantize_mlcc_row(t, x, xq, by_token, by_chunk, n_in: int, super_block: bool):
    block_columns = T.meta_var(SUPER_BLOCK if super_block else CHUNK)
    for blk in range(n_in // block_columns):
        amax = T.alloc_buffer((1,), "float32")
        amax[0] = _absmax(x, t, blk * block_columns, block_columns)
        d = T.meta_var(_mlcc_scale(amax[0], super_block))
        inv = T.meta_var(T.if_then_else(amax[0] > T.float32(0), T.float32(1) / d, T.float32(0)))
        for k in range(block_columns // CHUNK):
            c = T.meta_var(blk * (block_columns // CHUNK) + k)
            for i in T.unroll(CHUNK // PIECE):
                xq[t, T.Ramp(c * CHUNK + i * PIECE, 1, PIECE)] = _codes(x, t, c * CHUNK + i * PIECE, inv, T.round)
            by_token[t, 0, c] = d
            by_token[t, 1, c] = d * T.Cast("float32", _code_sum(xq, t, c * CHUNK, CHUNK))
            by_chunk[0, c, t] = by_token[t, 0, c]
            by_chunk[1, c, t] = by_token[t, 1, c]


@T.macro
def quantize_mlcc(x, xq, by_token, by_chunk, n, n_in: int, super_block: bool):
    """Per block of 32 columns (scale max|x| / 127 as float16) or, for super-block types, of 256 (scale
    1 / (127 / max|x|) as float32); each 32-column chunk's scale and scaled code sum into by_token [n, 2,
    chunks] and by_chunk [2, chunks, n]."""
    each_row(n, _quantize_mlcc_row, (x, xq, by_token, by_chunk, n_in, super_block))


@T.macro
def _quantize_q8_0_row(t, x, xq, x_scale, x_sum, chunks: int):
    for c in range(chunks):
        amax = T.alloc_buffer((1,), "float32")
        amax[0] = _absmax(x, t, c * CHUNK, CHUNK)
        d = T.meta_var(amax[0] / T.float32(127))
        inv = T.meta_var(_llamacpp_multiplier(amax[0]))
        for i in T.unroll(CHUNK // PIECE):
            xq[t, T.Ramp(c * CHUNK + i * PIECE, 1, PIECE)] = _codes(x, t, c * CHUNK + i * PIECE, inv, T.nearbyint)
        x_scale[t, c] = f16_round(d)
        x_sum[t, c] = f16_round(d * T.Cast("float32", _code_sum(xq, t, c * CHUNK, CHUNK)))


@T.macro
def quantize_q8_0(x, xq, x_scale, x_sum, n, chunks: int):
    """quantize_row_q8_0 / q8_1: d = max|x| / 127, q = round_half_even(x * (127 / max|x|)); x_scale [n,
    chunks] the float16 d, x_sum the float16 d * sum(q) (Q8_1's s), both as float32."""
    each_row(n, _quantize_q8_0_row, (x, xq, x_scale, x_sum, chunks))


@T.macro
def _quantize_q8_k_row(t, x, xq, x_scale, x_sum, supers: int, sums_per_super: int):
    sum_width = T.meta_var(SUPER_BLOCK // sums_per_super)
    for s in range(supers):
        amax = T.alloc_buffer((1,), "float32")
        amax[0] = _absmax(x, t, s * SUPER_BLOCK, SUPER_BLOCK)
        inv = T.meta_var(_llamacpp_multiplier(amax[0]))
        for i in T.unroll(SUPER_BLOCK // PIECE):
            at = T.meta_var(s * SUPER_BLOCK + i * PIECE)
            xq[t, T.Ramp(at, 1, PIECE)] = _codes(x, t, at, inv, T.nearbyint)
        x_scale[t, s] = T.if_then_else(amax[0] != T.float32(0), T.float32(1) / inv, T.float32(0))
        for k in T.unroll(sums_per_super):
            x_sum[t, s * sums_per_super + k] = _code_sum(xq, t, s * SUPER_BLOCK + k * sum_width, sum_width)


@T.macro
def quantize_q8_k(x, xq, x_scale, x_sum, n, supers: int, sums_per_super: int):
    """quantize_row_q8_K: multiplier 127 / max|x|, codes rounded half to even, d = 1 / multiplier (x_scale
    [n, supers]); x_sum [n, supers * sums_per_super] the codes' integer sums per 256 / sums_per_super."""
    each_row(n, _quantize_q8_k_row, (x, xq, x_scale, x_sum, supers, sums_per_super))
