"""Prefill matmuls on Intel AMX (int8 tile multiply-adds) in mlcc's orders ("gguf-fast"), bit for bit.

An integer sum is the same whatever adds it up, so where a kernel's float operations take exact integer sums,
AMX can compute those sums for 16 tokens x 16 rows per instruction and AVX-512 apply the same float operations
in the same order: the same bits as the VNNI kernel, which still takes fewer than 16 tokens (decode), so no
token's numbers depend on its batch.

- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (`amx_chunk_sum_rows`): `chunk_sum_rows` (matmul_llamacpp.py) computes y[t, o]
  as acc = fma(d_w[o, c] * d_x[t, c], float(s[t, o, c]), acc) over the 32-column chunks c in order, s the
  chunk's integer dot product of the codes (less their zero point) with the int8 activations, then the min
  terms likewise. One `tdpbssd` (`tdpbsud` for types with a min: unsigned codes) computes s for a chunk.
- Q4_K and Q6_K (`amx_super_rows`): one of llama.cpp's orders (matmul_llamacpp_kquants.py) for every token,
  one fused multiply-add per super-block of 256 columns with its exact integer sum: Q4_K the GEMV's, acc =
  fma(float(isum), d_w * d_x, acc) and mins = fma(float(imin), dmin_w * d_x, mins); Q6_K the tiled matmul's,
  acc = fma(d_w * float(isum), d_x, acc). isum (the codes times the activations times the integer sub-block
  scales) comes from tiles of code * scale, split into pieces that fit int8: Q4_K code * (scale % 8) and
  code * (scale // 8); Q6_K (code - 32) times each 2 bits of the signed scale. Q4_K's imin (the 6-bit mins
  times the activations' 32-column sums, below 2^24) is summed in floats, exactly.

Weights stay in `group_rows` form; a task unpacks two row groups (16 rows) at a time into the tile layout
(4 columns of each row side by side per tile row) once for all the tokens. A process must ask Linux for the
tile state before its first tile instruction (`artifacts.host_cpu.enable_amx`, which loading the artifact calls).
"""

from __future__ import annotations

import functools

from gguf import GGMLQuantizationType
from tvm import tirx
from tvm.script import tirx as T

from tir_kernels.activation_quant import quantize_q8_0, quantize_q8_k
from tir_kernels.gguf_blocks import CHUNK, SUPER_BLOCK
from tir_kernels.matmul_llamacpp import CHUNK_SUM_OFFSETS, chunk_sum_rows, group_word
from tir_kernels.matmul_llamacpp_kquants import kquant_rows, super_word
from tir_kernels.repack import GROUP_LAYOUTS, LANE_ROWS, SUPER_LAYOUTS
from tir_kernels.row_matmul import RowMatmul
from tir_kernels.simd import (
    TASKS,
    AskAhead,
    concat,
    fma,
    halves,
    task_share,
    u8x32,
    unit_count,
    unit_groups,
    vec_const,
)

Q = GGMLQuantizationType
TILE_TOKENS = 16  # a tile's rows: the tokens of one tile multiply, and the fewest tokens this path takes
TILE_ROWS = 2 * LANE_ROWS  # a tile's columns (of 4 bytes): two row groups side by side
HALF = TILE_TOKENS // 2  # token rows per accumulator buffer (two, each under the 1 KiB that stays on the stack)
C_TILE, A_TILE, B_TILE = 0, 1, 2  # chunk sums: sums [16 tokens, 16 rows], activations [16, 32], weights [8, 64]


def _tile(name: str, *tiles_and_args: tirx.PrimExpr | int) -> tirx.PrimExpr:
    args = [tirx.const(a, "int8") if isinstance(a, int) else a for a in tiles_and_args]
    return tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


def _palette(shapes: dict[int, tuple[int, int]]) -> tirx.PrimExpr:
    """The 64-byte tile configuration (palette 1) giving tile i `rows` rows of `width` bytes, as a vector."""
    config = [0] * 64
    config[0] = 1
    for tile, (rows, width) in shapes.items():
        config[16 + 2 * tile] = width  # a little-endian uint16, under 256 here
        config[48 + tile] = rows
    return vec_const(config, "uint8")


@T.macro
def _configure_tiles(cfg, palette):
    cfg[T.Ramp(0, 1, 64)] = palette
    T.evaluate(_tile("ldtilecfg", T.address_of(cfg[0])))


def _sixteen(buf: tirx.Buffer, row, at=0) -> tirx.PrimExpr:
    return tirx.BufferLoad(buf, [row, tirx.Ramp(at, 1, TILE_ROWS)])


@T.macro
def _store_tile_row(y, acc, i, t, p, n_out: int):
    """y[t, 16p .. 16p + 16] = acc[i], rows past n_out dropped."""
    if p * TILE_ROWS + TILE_ROWS <= n_out:
        y[t, T.Ramp(p * TILE_ROWS, 1, TILE_ROWS)] = _sixteen(acc, i)
    else:
        for r in range(TILE_ROWS):
            if p * TILE_ROWS + r < n_out:
                y[t, p * TILE_ROWS + r] = acc[i, r]


def _prefill_on_amx(amx_body, vnni: RowMatmul) -> RowMatmul:
    """`amx_body` for 16 tokens or more, the VNNI kernel (the same bits) for fewer."""

    @T.macro
    def body(x, data, y, n, capacity):
        if n >= TILE_TOKENS:
            amx_body(x, data, y, n, capacity)
        else:
            vnni.body(x, data, y, n, capacity)

    return RowMatmul(body, vnni.n_in, vnni.n_out, vnni.data_shape)


CHUNK_TILES = {C_TILE: (TILE_TOKENS, 4 * TILE_ROWS), A_TILE: (TILE_TOKENS, CHUNK), B_TILE: (CHUNK // 4, 4 * TILE_ROWS)}
SUPER_TILES = {tile: (TILE_TOKENS, 4 * TILE_ROWS) for tile in range(8)}  # K-quants: sums, activations, weights


@functools.cache
def amx_chunk_sum_rows(
    qtype: GGMLQuantizationType, n_in: int, n_out: int, ask_ahead: AskAhead = AskAhead.NONE
) -> RowMatmul:
    """`chunk_sum_rows` with its integer chunk sums on AMX for 16 tokens or more, W in `group_rows` form."""
    vnni = chunk_sum_rows(qtype, n_in, n_out, ask_ahead)
    lay = GROUP_LAYOUTS[qtype]
    gb = lay.group_bytes
    chunks = n_in // CHUNK
    row_groups = -(-n_out // LANE_ROWS)
    pairs = unit_count(row_groups, True)
    tasks = min(TASKS, pairs)
    has_min = lay.minimum is not None
    product = "tdpbsud" if has_min else "tdpbssd"  # int8 activations times unsigned / signed codes
    zero = 0 if has_min or qtype == Q.Q8_0 else CHUNK_SUM_OFFSETS[qtype]

    def weight_bytes(data, g, c, m) -> tirx.PrimExpr:
        """int8x32: word m of chunk c for the 8 rows of group g as the tile multiply takes them."""
        word = group_word(qtype, data, g, c, m)
        return tirx.reinterpret("int8x32", word - u8x32(zero) if zero else word)

    @T.macro
    def unpack(data, p, tile_w, d_w, m_w):
        """Row groups 2p and 2p + 1 (the last group twice where their count is odd): words into tile_w [chunks
        * 8, 64] (tile row 8c + m: word m of both groups), scales and mins into d_w, m_w [chunks, 16]."""
        groups = T.meta_var(unit_groups(p, row_groups, True))
        for c in range(chunks):
            for m in T.unroll(8):
                tile_w[c * 8 + m, T.Ramp(0, 1, 32)] = weight_bytes(data, groups[0], c, m)
                tile_w[c * 8 + m, T.Ramp(32, 1, 32)] = weight_bytes(data, groups[1], c, m)
            d_w[c, T.Ramp(0, 1, TILE_ROWS)] = concat([halves(data, g, c * gb) for g in groups])
            if has_min:
                m_w[c, T.Ramp(0, 1, TILE_ROWS)] = concat([halves(data, g, c * gb + lay.minimum) for g in groups])

    @T.macro
    def scale_in(acc, sums, d_w, x_scale, t0, c, first):
        """Token rows first .. first + HALF of the chunk's integer sums into acc [HALF, 16] (one fma each)."""
        for i in T.unroll(HALF):
            acc[i, T.Ramp(0, 1, TILE_ROWS)] = fma(
                _sixteen(d_w, c) * T.Broadcast(x_scale[t0 + first + i, c], TILE_ROWS),
                _sixteen(sums, first + i).astype(f"float32x{TILE_ROWS}"),
                _sixteen(acc, i),
            )

    @T.macro
    def finish(y, acc, m_w, x_sum, p, t0, first):
        """Token rows first .. first + HALF: the min terms (summed as the VNNI kernel does) added, stored."""
        for i in T.unroll(HALF):
            if has_min:
                mins = T.alloc_buffer((1, TILE_ROWS), "float32")
                mins[0, T.Ramp(0, 1, TILE_ROWS)] = T.Broadcast(T.float32(0), TILE_ROWS)
                for c in range(chunks):
                    mins[0, T.Ramp(0, 1, TILE_ROWS)] = fma(
                        _sixteen(m_w, c), T.Broadcast(x_sum[t0 + first + i, c], TILE_ROWS), _sixteen(mins, 0)
                    )
                acc[i, T.Ramp(0, 1, TILE_ROWS)] = _sixteen(acc, i) + _sixteen(mins, 0)
            _store_tile_row(y, acc, i, t0 + first + i, p, n_out)

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
            _configure_tiles(cfg, _palette(CHUNK_TILES))
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

    return _prefill_on_amx(amx_body, vnni)


@functools.cache
def amx_super_rows(
    qtype: GGMLQuantizationType, n_in: int, n_out: int, vector_registers: int, ask_ahead: AskAhead = AskAhead.NONE
) -> RowMatmul:
    """Q4_K or Q6_K in one of llama.cpp's orders for every token (`kquant_rows(..., one_order=True)`: Q4_K the
    GEMV's, Q6_K the tiled matmul's), its integer sums on AMX for 16 tokens or more, W in `group_rows` form.

    isum = sum_k x_k * code_k * scale_k, the integer sub-block scale folded into the weight tiles in `parts`
    pieces small enough for int8: Q4_K code (0..15) * (scale % 8) and * (scale // 8), isum = s_0 + 8 s_1; Q6_K
    (code - 32) times each 2 bits of its signed 8-bit scale, isum = s_0 + 4 s_1 + 16 s_2 + 64 s_3 (the code's
    offset of 32 inside the tile, where llama.cpp subtracts 32 * scale * the activations' 16-column sums)."""
    vnni = kquant_rows(qtype, n_in, n_out, True, vector_registers, one_order=True, ask_ahead=ask_ahead)
    lay = SUPER_LAYOUTS[qtype]
    q6 = qtype == Q.Q6_K
    parts, shift = (4, 2) if q6 else (2, 3)  # scale pieces of `shift` bits
    token_tiles = 4 // parts  # token tiles a step: four sum tiles in flight
    sums_per_super = 16 if q6 else 8
    supers = n_in // SUPER_BLOCK
    row_groups = -(-n_out // LANE_ROWS)
    pairs = unit_count(row_groups, True)
    tasks = min(TASKS, pairs)
    spread = [tirx.IntImm("int32", r) for r in range(LANE_ROWS) for _ in range(4)]  # a row's byte to its 4 columns
    x_tiles = list(range(4, 4 + token_tiles))  # after the sum tiles 0..3 (tile u * parts + i)
    w_tiles = list(range(4 + token_tiles, 4 + token_tiles + (parts if token_tiles > 1 else 1)))

    def scale_piece(scales: tirx.PrimExpr, i: int) -> tirx.PrimExpr:
        """int16x8: bits shift*i .. of the rows' scales (Q6_K's signed: its top piece keeps the sign)."""
        wide = (tirx.reinterpret("int8x8", scales) if q6 else scales).astype("int16x8")
        piece = wide >> tirx.Broadcast(tirx.const(shift * i, "int16"), 8)
        return piece if i == parts - 1 else piece & tirx.Broadcast(tirx.const((1 << shift) - 1, "int16"), 8)

    def scaled_codes(data, g, base, c, m, i: int) -> tirx.PrimExpr:
        """int8x32: word m of chunk c for the 8 rows of group g, each code (Q6_K less 32) times piece i of its
        sub-block's scale (Q4_K: at most 15 * 7; Q6_K: 32 * 3)."""
        sub = c if not q6 else 2 * c + m // 4  # Q4_K's sub-blocks are 32 columns, Q6_K's 16
        scales = tirx.BufferLoad(data, [g, tirx.Ramp(base + lay.sub_scales + 8 * sub, 1, 8)])
        factor = tirx.Shuffle([scale_piece(scales, i)] * 4, spread)
        codes = super_word(qtype, data, g, base, c, m).astype("int16x32")
        if q6:
            codes = codes - tirx.Broadcast(tirx.const(32, "int16"), 32)
        return (codes * factor).astype("int8x32")

    def chunk_words(data, groups, base, c, i: int) -> tirx.PrimExpr:
        """int8x512: tile rows 8c .. 8c + 7 of the super-block (word m of both groups in row 8c + m), piece i."""
        return concat([scaled_codes(data, g, base, c, m, i) for m in range(8) for g in groups])

    def row_mins(data, g, base, j) -> tirx.PrimExpr:
        """float32x8: the 8 rows' 6-bit mins of sub-block j (Q4_K)."""
        return tirx.BufferLoad(data, [g, tirx.Ramp(base + lay.sub_mins + 8 * j, 1, 8)]).astype("float32x8")

    tile_bytes = 64 * 4 * TILE_ROWS  # one piece of a super-block's weight tiles: 64 rows of 64 bytes

    @T.macro
    def unpack_piece(data, groups, base, s, c, weights, i: int):
        at = T.meta_var((s * parts + i) * tile_bytes + c * 8 * 4 * TILE_ROWS)
        weights[T.Ramp(at, 1, 8 * 4 * TILE_ROWS)] = chunk_words(data, groups, base, c, i)

    @T.macro
    def unpack(data, p, weights, d_w, dmin_w, mins_w):
        """Row groups 2p and 2p + 1 (the last group twice where their count is odd) into the tile layout:
        weights [(s * parts + i) * 64 + 8c + m, 64 bytes] holds piece i of word m of chunk c of super-block s of
        both groups; the rows' d (and Q4_K's dmin [supers, 16] and mins [supers * 8, 16])."""
        groups = T.meta_var(unit_groups(p, row_groups, True))
        for s in range(supers):
            base = T.meta_var(s * lay.size)
            for c in range(8):
                unpack_piece(data, groups, base, s, c, weights, 0)
                unpack_piece(data, groups, base, s, c, weights, 1)
                if q6:
                    unpack_piece(data, groups, base, s, c, weights, 2)
                    unpack_piece(data, groups, base, s, c, weights, 3)
                else:
                    mins_w[s * 8 + c, T.Ramp(0, 1, TILE_ROWS)] = concat([row_mins(data, g, base, c) for g in groups])
            d_w[s, T.Ramp(0, 1, TILE_ROWS)] = concat([halves(data, g, base) for g in groups])
            if not q6:
                dmin_w[s, T.Ramp(0, 1, TILE_ROWS)] = concat([halves(data, g, base + lay.minimum) for g in groups])

    def isum(sums, u: int, i_row) -> tirx.PrimExpr:
        """int32x16: token row i_row of token tile u: the pieces' sums, each times 2^(shift * piece)."""
        total = tirx.BufferLoad(sums, [u * parts, i_row, tirx.Ramp(0, 1, TILE_ROWS)])
        for i in range(1, parts):
            piece = tirx.BufferLoad(sums, [u * parts + i, i_row, tirx.Ramp(0, 1, TILE_ROWS)])
            total = total + (piece << tirx.Broadcast(tirx.const(shift * i, "int32"), TILE_ROWS))
        return total

    @T.macro
    def scale_in(acc, row0, sums, u: int, d_w, x_scale, t0, s):
        """Token tile u (accumulators acc[row0 ..]): Q4_K acc = fma(float(isum), d_w * d_x, acc); Q6_K acc =
        fma(d_w * float(isum), d_x, acc)."""
        for i in T.unroll(TILE_TOKENS):
            total = T.meta_var(isum(sums, u, i).astype(f"float32x{TILE_ROWS}"))
            d_x = T.meta_var(T.Broadcast(x_scale[t0 + i, s], TILE_ROWS))
            if q6:
                acc[row0 + i, T.Ramp(0, 1, TILE_ROWS)] = fma(_sixteen(d_w, s) * total, d_x, _sixteen(acc, row0 + i))
            else:
                acc[row0 + i, T.Ramp(0, 1, TILE_ROWS)] = fma(total, _sixteen(d_w, s) * d_x, _sixteen(acc, row0 + i))

    def min_sum(mins_w, x_sums, t, s) -> tirx.PrimExpr:
        """float32x16: sum_j min_j * (token t's 32-column sum j) over super-block s, exact (every partial sum an
        integer below 2^24), in fused multiply-adds."""
        total = tirx.Broadcast(tirx.const(0, "float32"), TILE_ROWS)
        for j in range(8):
            total = fma(_sixteen(mins_w, s * 8 + j), tirx.Broadcast(x_sums[t, s * 8 + j], TILE_ROWS), total)
        return total

    @T.macro
    def finish(y, acc, row0, dmin_w, mins_w, x_scale, x_sums, p, t0):
        """The tile's 16 tokens stored; Q4_K's less mins = fma(float(imin), dmin_w * d_x, mins) per super-block."""
        for i in T.unroll(TILE_TOKENS):
            if not q6:
                mins = T.alloc_buffer((1, TILE_ROWS), "float32")
                mins[0, T.Ramp(0, 1, TILE_ROWS)] = T.Broadcast(T.float32(0), TILE_ROWS)
                for s in range(supers):
                    mins[0, T.Ramp(0, 1, TILE_ROWS)] = fma(
                        min_sum(mins_w, x_sums, t0 + i, s),
                        _sixteen(dmin_w, s) * T.Broadcast(x_scale[t0 + i, s], TILE_ROWS),
                        _sixteen(mins, 0),
                    )
                acc[row0 + i, T.Ramp(0, 1, TILE_ROWS)] = _sixteen(acc, row0 + i) - _sixteen(mins, 0)
            _store_tile_row(y, acc, row0 + i, t0 + i, p, n_out)

    @T.macro
    def load_x(xq, t0, s, k, u: int):
        x_at = T.meta_var(T.address_of(xq[t0, s * SUPER_BLOCK + k * 64]))
        T.evaluate(_tile("tileloadd64", x_tiles[u], x_at, T.int64(n_in)))

    @T.macro
    def multiply_piece(weights, s, k, i: int):
        """Each token tile's sums of piece i += its activations times the piece's weight tile."""
        w_tile = T.meta_var(w_tiles[i % len(w_tiles)])
        w_at = T.meta_var(T.address_of(weights[(s * parts + i) * tile_bytes + k * 16 * 4 * TILE_ROWS]))
        T.evaluate(_tile("tileloadd64", w_tile, w_at, T.int64(4 * TILE_ROWS)))
        T.evaluate(_tile("tdpbssd", i, x_tiles[0], w_tile))
        if token_tiles > 1:
            T.evaluate(_tile("tdpbssd", parts + i, x_tiles[1], w_tile))

    @T.macro
    def multiply(xq, weights, starts, s, k):
        """Columns 64k .. 64k + 64 of super-block s: each token tile's sums += its activations times each
        piece's weight tile (with one token tile a step, one weight tile register, loaded piece by piece)."""
        load_x(xq, starts[0], s, k, 0)
        if token_tiles > 1:
            load_x(xq, starts[1], s, k, 1)
        multiply_piece(weights, s, k, 0)
        multiply_piece(weights, s, k, 1)
        if parts > 2:
            multiply_piece(weights, s, k, 2)
            multiply_piece(weights, s, k, 3)

    @T.macro
    def zero_sums():
        T.evaluate(_tile("tilezero", 0))
        T.evaluate(_tile("tilezero", 1))
        T.evaluate(_tile("tilezero", 2))
        T.evaluate(_tile("tilezero", 3))

    @T.macro
    def store_sums(sums):
        T.evaluate(_tile("tilestored64", 0, T.address_of(sums[0, 0, 0]), T.int64(4 * TILE_ROWS)))
        T.evaluate(_tile("tilestored64", 1, T.address_of(sums[1, 0, 0]), T.int64(4 * TILE_ROWS)))
        T.evaluate(_tile("tilestored64", 2, T.address_of(sums[2, 0, 0]), T.int64(4 * TILE_ROWS)))
        T.evaluate(_tile("tilestored64", 3, T.address_of(sums[3, 0, 0]), T.int64(4 * TILE_ROWS)))

    @T.macro
    def amx_body(x, data, y, n, capacity):
        xq = T.alloc_buffer((capacity, n_in), "int8")
        x_scale = T.alloc_buffer((capacity, supers), "float32")
        x_sum = T.alloc_buffer((capacity, supers * sums_per_super), "int32")
        quantize_q8_k(x, xq, x_scale, x_sum, n, supers, sums_per_super)
        x_sums = T.alloc_buffer((1, 1) if q6 else (capacity, supers * 8), "float32")  # Q4_K's sums as floats
        if not q6:
            for t in range(n):
                for j in range(supers * 8):
                    x_sums[t, j] = T.Cast("float32", x_sum[t, j])
        for task in T.parallel(tasks):
            cfg = T.alloc_buffer((64,), "uint8")
            weights = T.alloc_buffer((supers * parts * tile_bytes,), "int8")
            d_w = T.alloc_buffer((supers, TILE_ROWS), "float32")
            dmin_w = T.alloc_buffer((1 if q6 else supers, TILE_ROWS), "float32")  # Q4_K's dmin and mins
            mins_w = T.alloc_buffer((1 if q6 else supers * 8, TILE_ROWS), "float32")
            sums = T.alloc_buffer((4, TILE_TOKENS, TILE_ROWS), "int32")  # [token tile * parts + piece, ..]
            tiles = T.meta_var((n + TILE_TOKENS - 1) // TILE_TOKENS)
            # each tile's accumulators, and one more for the second of a last, unpaired tile (a duplicate); sized
            # by `capacity` (an expert's row count `n` is loaded inside the grouped kernel)
            acc = T.alloc_buffer(((capacity + 2 * TILE_TOKENS - 1) // TILE_TOKENS * TILE_TOKENS, TILE_ROWS), "float32")
            _configure_tiles(cfg, _palette(SUPER_TILES))
            first_pair, task_pairs = T.meta_var(task_share(task, tasks, pairs))
            for pi in range(task_pairs):
                p = T.meta_var(first_pair + pi)
                unpack(data, p, weights, d_w, dmin_w, mins_w)
                for r in range(tiles * TILE_TOKENS):
                    acc[r, T.Ramp(0, 1, TILE_ROWS)] = T.Broadcast(T.float32(0), TILE_ROWS)
                # super-block by super-block, each over all the token tiles (its weight tiles stay in L1)
                for s in range(supers):
                    for step in range((tiles + token_tiles - 1) // token_tiles):
                        starts = T.meta_var(
                            [T.min((token_tiles * step + u) * TILE_TOKENS, n - TILE_TOKENS) for u in range(token_tiles)]
                        )
                        zero_sums()
                        for k in T.unroll(4):  # 64 columns a step
                            multiply(xq, weights, starts, s, k)
                        store_sums(sums)
                        scale_in(acc, token_tiles * step * TILE_TOKENS, sums, 0, d_w, x_scale, starts[0], s)
                        if token_tiles > 1:
                            scale_in(acc, (2 * step + 1) * TILE_TOKENS, sums, 1, d_w, x_scale, starts[1], s)
                for tile in range(tiles):
                    t0 = T.meta_var(T.min(tile * TILE_TOKENS, n - TILE_TOKENS))
                    finish(y, acc, tile * TILE_TOKENS, dmin_w, mins_w, x_scale, x_sums, p, t0)
            T.evaluate(_tile("tilerelease"))

    return _prefill_on_amx(amx_body, vnni)
