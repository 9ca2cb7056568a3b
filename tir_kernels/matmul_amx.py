"""Prefill matmuls on Intel AMX (int8 tile multiply-adds) in mlcc's chunk-sum order, bit for bit.

`chunk_sum_rows` (matmul_llamacpp.py) computes y[t, o] as acc = fma(d_w[o, c] * d_x[t, c], float(s[t, o, c]),
acc) over the 32-column chunks c in order, s the chunk's integer dot product of the codes (less their zero
point) with the int8 activations, then the min terms likewise. An integer sum is the same whatever adds it up,
so here one `tdpbssd` (`tdpbsud` for types with a min: unsigned codes) computes s for 16 tokens x 16 rows of a
chunk (8,192 multiply-adds) and AVX-512 scales it into the accumulators in the same order: the same bits as
the VNNI kernel, which still takes fewer than 16 tokens (decode), so no token's numbers depend on its batch.

Weights stay in `group_rows` form; a task unpacks two row groups (16 rows) at a time into the tile layout
(4 columns of each row side by side per tile row) once for all the tokens. A process must ask Linux for the
tile state before its first tile instruction (`artifacts.host_cpu.enable_amx`, which loading the artifact calls).
"""

from __future__ import annotations

import functools

from gguf import GGMLQuantizationType
from tvm import tirx
from tvm.script import tirx as T

from tir_kernels.activation_quant import quantize_q8_0
from tir_kernels.gguf_blocks import CHUNK
from tir_kernels.matmul_llamacpp import CHUNK_SUM_OFFSETS, chunk_sum_rows, group_word
from tir_kernels.repack import GROUP_LAYOUTS, LANE_ROWS
from tir_kernels.row_matmul import RowMatmul
from tir_kernels.simd import TASKS, concat, fma, task_share, u8x32

Q = GGMLQuantizationType
TILE_TOKENS = 16  # a tile's rows: the tokens of one tile multiply, and the fewest tokens this path takes
TILE_ROWS = 2 * LANE_ROWS  # a tile's columns (of 4 bytes): two row groups side by side
HALF = TILE_TOKENS // 2  # token rows per accumulator buffer (two, each under the 1 KiB that stays on the stack)
C_TILE, A_TILE, B_TILE = 0, 1, 2  # tile registers: sums [16 tokens, 16 rows], activations [16, 32], weights [8, 64]


def _tile(name: str, *tiles_and_args: tirx.PrimExpr | int) -> tirx.PrimExpr:
    args = [tirx.const(a, "int8") if isinstance(a, int) else a for a in tiles_and_args]
    return tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


@T.macro
def _configure_tiles(cfg):
    """Palette 1: C 16 rows of 64 bytes, A 16 rows of 32 (one chunk of 16 tokens), B 8 rows of 64."""
    cfg[T.Ramp(0, 1, 64)] = T.Broadcast(T.uint8(0), 64)
    cfg[0] = T.uint8(1)
    cfg[16 + 2 * C_TILE] = T.uint8(4 * TILE_ROWS)
    cfg[48 + C_TILE] = T.uint8(TILE_TOKENS)
    cfg[16 + 2 * A_TILE] = T.uint8(CHUNK)
    cfg[48 + A_TILE] = T.uint8(TILE_TOKENS)
    cfg[16 + 2 * B_TILE] = T.uint8(4 * TILE_ROWS)
    cfg[48 + B_TILE] = T.uint8(CHUNK // 4)
    T.evaluate(_tile("ldtilecfg", T.address_of(cfg[0])))


@functools.cache
def amx_chunk_sum_rows(qtype: GGMLQuantizationType, n_in: int, n_out: int) -> RowMatmul:
    """`chunk_sum_rows` with its integer chunk sums on AMX for 16 tokens or more, W in `group_rows` form."""
    vnni = chunk_sum_rows(qtype, n_in, n_out)
    lay = GROUP_LAYOUTS[qtype]
    gb = lay.group_bytes
    chunks = n_in // CHUNK
    row_groups = -(-n_out // LANE_ROWS)
    pairs = -(-row_groups // 2)
    tasks = min(TASKS, pairs)
    has_min = lay.minimum is not None
    product = "tdpbsud" if has_min else "tdpbssd"  # int8 activations times unsigned / signed codes
    zero = 0 if has_min or qtype == Q.Q8_0 else CHUNK_SUM_OFFSETS[qtype]

    def weight_bytes(data, g, c, m) -> tirx.PrimExpr:
        """int8x32: word m of chunk c for the 8 rows of group g as the tile multiply takes them."""
        word = group_word(qtype, data, g, c, m)
        return tirx.reinterpret("int8x32", word - u8x32(zero) if zero else word)

    def halves(data, g, c, at: int) -> tirx.PrimExpr:
        raw = tirx.BufferLoad(data, [g, tirx.Ramp(c * gb + at, 1, 16)])
        return tirx.reinterpret("float16x8", raw).astype("float32x8")

    def sixteen(buf, row, at=0) -> tirx.PrimExpr:
        return tirx.BufferLoad(buf, [row, tirx.Ramp(at, 1, TILE_ROWS)])

    @T.macro
    def unpack(data, p, tile_w, d_w, m_w):
        """Row groups 2p and 2p + 1 (the last group twice where their count is odd): words into tile_w [chunks
        * 8, 64] (tile row 8c + m: word m of both groups), scales and mins into d_w, m_w [chunks, 16]."""
        groups = T.meta_var((2 * p, T.min(2 * p + 1, row_groups - 1)))
        for c in range(chunks):
            for m in T.unroll(8):
                tile_w[c * 8 + m, T.Ramp(0, 1, 32)] = weight_bytes(data, groups[0], c, m)
                tile_w[c * 8 + m, T.Ramp(32, 1, 32)] = weight_bytes(data, groups[1], c, m)
            d_w[c, T.Ramp(0, 1, TILE_ROWS)] = concat([halves(data, g, c, 0) for g in groups])
            if has_min:
                m_w[c, T.Ramp(0, 1, TILE_ROWS)] = concat([halves(data, g, c, lay.minimum) for g in groups])

    @T.macro
    def scale_in(acc, sums, d_w, x_scale, t0, c, first):
        """Token rows first .. first + HALF of the chunk's integer sums into acc [HALF, 16] (one fma each)."""
        for i in T.unroll(HALF):
            acc[i, T.Ramp(0, 1, TILE_ROWS)] = fma(
                sixteen(d_w, c) * T.Broadcast(x_scale[t0 + first + i, c], TILE_ROWS),
                sixteen(sums, first + i).astype(f"float32x{TILE_ROWS}"),
                sixteen(acc, i),
            )

    @T.macro
    def finish(y, acc, m_w, x_sum, p, t0, first):
        """Token rows first .. first + HALF: the min terms (summed as the VNNI kernel does) added, rows past
        n_out dropped."""
        for i in T.unroll(HALF):
            if has_min:
                mins = T.alloc_buffer((1, TILE_ROWS), "float32")
                mins[0, T.Ramp(0, 1, TILE_ROWS)] = T.Broadcast(T.float32(0), TILE_ROWS)
                for c in range(chunks):
                    mins[0, T.Ramp(0, 1, TILE_ROWS)] = fma(
                        sixteen(m_w, c), T.Broadcast(x_sum[t0 + first + i, c], TILE_ROWS), sixteen(mins, 0)
                    )
                acc[i, T.Ramp(0, 1, TILE_ROWS)] = sixteen(acc, i) + sixteen(mins, 0)
            if p * TILE_ROWS + TILE_ROWS <= n_out:
                y[t0 + first + i, T.Ramp(p * TILE_ROWS, 1, TILE_ROWS)] = sixteen(acc, i)
            else:
                for r in range(TILE_ROWS):
                    if p * TILE_ROWS + r < n_out:
                        y[t0 + first + i, p * TILE_ROWS + r] = acc[i, r]

    @T.macro
    def amx_body(x, data, y, n, capacity):
        xq = T.alloc_buffer((capacity, n_in), "int8")
        x_scale = T.alloc_buffer((capacity, chunks), "float32")
        x_sum = T.alloc_buffer((capacity, chunks), "float32")
        quantize_q8_0(x, xq, x_scale, x_sum, n, chunks)
        # Pairs of row groups in `tasks` parallel ranges; every token tile (the last one ending at the last
        # token, overlapping the one before) passes over a pair's unpacked words.
        for task in T.parallel(tasks):
            cfg = T.alloc_buffer((64,), "uint8")
            tile_w = T.alloc_buffer((chunks * 8, 4 * TILE_ROWS), "int8")
            d_w = T.alloc_buffer((chunks, TILE_ROWS), "float32")
            m_w = T.alloc_buffer((chunks if has_min else 1, TILE_ROWS), "float32")
            sums = T.alloc_buffer((TILE_TOKENS, TILE_ROWS), "int32")
            acc_low = T.alloc_buffer((HALF, TILE_ROWS), "float32")
            acc_high = T.alloc_buffer((HALF, TILE_ROWS), "float32")
            _configure_tiles(cfg)
            first_pair, task_pairs = T.meta_var(task_share(task, tasks, pairs))
            for pi in range(task_pairs):
                p = T.meta_var(first_pair + pi)
                unpack(data, p, tile_w, d_w, m_w)
                for tile in range((n + TILE_TOKENS - 1) // TILE_TOKENS):
                    t0 = T.meta_var(T.min(tile * TILE_TOKENS, n - TILE_TOKENS))
                    for i in T.unroll(HALF):
                        acc_low[i, T.Ramp(0, 1, TILE_ROWS)] = T.Broadcast(T.float32(0), TILE_ROWS)
                        acc_high[i, T.Ramp(0, 1, TILE_ROWS)] = T.Broadcast(T.float32(0), TILE_ROWS)
                    for c in range(chunks):
                        T.evaluate(_tile("tilezero", C_TILE))
                        T.evaluate(_tile("tileloadd64", A_TILE, T.address_of(xq[t0, c * CHUNK]), T.int64(n_in)))
                        T.evaluate(_tile("tileloadd64", B_TILE, T.address_of(tile_w[c * 8, 0]), T.int64(64)))
                        T.evaluate(_tile(product, C_TILE, A_TILE, B_TILE))
                        T.evaluate(_tile("tilestored64", C_TILE, T.address_of(sums[0, 0]), T.int64(64)))
                        scale_in(acc_low, sums, d_w, x_scale, t0, c, 0)
                        scale_in(acc_high, sums, d_w, x_scale, t0, c, HALF)
                    finish(y, acc_low, m_w, x_sum, p, t0, 0)
                    finish(y, acc_high, m_w, x_sum, p, t0, HALF)
            T.evaluate(_tile("tilerelease"))

    @T.macro
    def body(x, data, y, n, capacity):
        if n >= TILE_TOKENS:
            amx_body(x, data, y, n, capacity)
        else:
            vnni.body(x, data, y, n, capacity)

    return RowMatmul(body, n_in, n_out, vnni.data_shape)
