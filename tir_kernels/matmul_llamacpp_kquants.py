"""llama.cpp's K-quant matmuls on x86 CPUs with AVX2, op for op (see tir_kernels/matmul_llamacpp.py for why):

- Q4_K goes through llama.cpp's repacked 8-row kernels (`ggml_gemv_q4_K_8x8_q8_K`, `ggml_gemm_..._q8_K`): the
  integer sums of sub-blocks times their 6-bit scales (and the activations' sums times the 6-bit mins) are
  exact; then acc += float(isum) * (d_w * d_x) and mins += float(imin) * (dmin_w * d_x), fused, and the row's
  result is acc - mins. The GEMM (tokens in fours: all but the last n % 4 of a batch) does this per pair of
  sub-blocks, the GEMV (the rest) once per super-block of 256 columns.
- Q6_K goes through `ggml_vec_dot_q6_K_q8_K` for batches of up to 7 tokens: 8 integer lanes per super-block,
  lane L holding columns 4L..4L+3 of each 32-column chunk times its 16-column scale, less 32 * the scaled
  sums of the activations' 16-column blocks 2L and 2L + 1; each lane fused into a float accumulator with
  d_w * d_x, and the 8 lanes summed as `hsum_float_8` at the end. Larger batches go through ggml's tiled
  K-quant matmul (ggml-cpu/tiled): per super-block acc += (d_w * float(isum)) * d_x, fused, isum the whole
  super-block's exact integer sum.

Activations are quantized per 256 columns as `quantize_row_q8_K`: multiplier 127 / max|x|, codes rounded half
to even, scale 1 / multiplier. As in tir_kernels/matmul_llamacpp.py, 8 rows go side by side (row r in vector lane r),
so each vector instruction does, lane for lane, what llama.cpp does for one row.
"""

from __future__ import annotations

import functools

from gguf import GGMLQuantizationType
from tvm import tirx
from tvm.script import tirx as T

from tir_kernels.activation_quant import quantize_q8_k
from tir_kernels.gguf_blocks import CHUNK, SUPER_BLOCK
from tir_kernels.repack import LANE_ROWS, SUPER_LAYOUTS
from tir_kernels.row_matmul import RowMatmul
from tir_kernels.simd import (
    LANE_ACTIVATION_BYTES,
    QUAD,
    TASKS,
    TOKEN_AHEAD,
    TOKENS,
    AskAhead,
    claim_words,
    claimed_tasks,
    clear_claims,
    concat,
    each_token_block,
    fma,
    halves,
    lane_sum,
    llvm_intrin,
    load,
    shift_bytes,
    store_groups,
    stream_groups,
    task_share,
    tree_sum,
    u8x32,
    unit_count,
    unit_group_range,
    unit_groups,
    vpdpbusd,
)

Q = GGMLQuantizationType
# Bytes ahead of the chunk being multiplied that each Q6_K chunk asks for, a few lines at a time: its one-token
# kernel read 6.8 GB/s from memory with the hardware prefetcher alone (its codes are two interleaved streams),
# 22-26 GB/s so; the whole next super-blocks asked for at once did not help (6-10 GB/s). One-token passes now ask
# `simd.TOKEN_AHEAD` bytes on, into L2 (Q6_K 2048x8192, 1 / 2 threads: 10.6 / 20.6 -> 12.6 / 24.8 GB/s).
AHEAD = 1536
# Q4_K's one-token kernel on rows this long asks for its weights ahead on every CPU, one group at a time: there a
# token's activations (n_in bytes, read again for each group) no longer stay in L1 beside the weights streaming
# through, and the hardware prefetcher falls behind (Zen 4, 1 thread, GB/s from memory: 8192x2048 20.9 -> 26.5,
# 4096x4096 23.4 -> 26.5, 14336x4096 19.3 -> 23.6, 2 threads 8192x2048 level; 3072x8192 21.3 -> 19.8 and
# 2048x8192 23.8 -> 22.4 so, hence not below this).
LONG_ROW = 4096


def low_bytes(qtype: GGMLQuantizationType, data: tirx.Buffer, g, base, c, m: int) -> tirx.PrimExpr:
    """uint8x32: the bytes holding the low 4 bits of words m and m + 4 of chunk c (m < 4; low and high nibbles)
    of the super-block at byte `base`, for the 8 rows of group g in `group_rows` form."""
    return load(data, g, base + SUPER_LAYOUTS[qtype].low + c * 128 + 32 * m, 32)


def super_word(qtype: GGMLQuantizationType, data: tirx.Buffer, g, base, c, m: int) -> tirx.PrimExpr:
    """uint8x32: word m (columns 4m..4m+3) of chunk c of the super-block at byte `base` for the 8 rows of group
    g in `group_rows` form: the unsigned codes (Q4_K 0..15, Q6_K 0..63)."""
    lay = SUPER_LAYOUTS[qtype]
    packed = low_bytes(qtype, data, g, base, c, m % 4)
    low = packed & u8x32(15) if m < 4 else shift_bytes(packed, 4, right=True) & u8x32(15)
    if lay.high is None:
        return low
    bits = tirx.BufferLoad(data, [g, tirx.Ramp(base + lay.high + c * 64 + 32 * (m % 2), 1, 32)])
    up = 4 - 2 * (m // 2)  # bits 2 (m // 2) and the next move to 4 and 5
    return low | (shift_bytes(bits, abs(up), right=up < 0) & u8x32(0x30))


def _pairs_to_int16(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """int16 scales of V rows -> 2 V int16 lanes with each repeated (the two int16 lanes of a row)."""
    lanes = v.ty.dtype.lanes
    return tirx.Shuffle([v, v], [tirx.IntImm("int32", i // 2) for i in range(2 * lanes)])


def _madd(kind: str, a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    """`pmaddubsw` ("ub") or `pmaddwd` ("wd") of a and b on 256 or 512 bits (8 or 16 rows' lanes)."""
    bits = a.ty.dtype.bits * a.ty.dtype.lanes
    out_bits = 16 if kind == "ub" else 32
    name = {"ub": ("avx2.pmadd.ub.sw", "avx512.pmaddubs.w.512"), "wd": ("avx2.pmadd.wd", "avx512.pmaddw.d.512")}
    return llvm_intrin(f"int{out_bits}x{bits // out_bits}", f"llvm.x86.{name[kind][bits == 512]}", a, b)


@functools.cache
def kquant_rows(
    qtype: GGMLQuantizationType,
    n_in: int,
    n_out: int,
    vnni: bool = False,
    vector_registers: int = 16,
    one_order: bool = False,
    ask_ahead: AskAhead = AskAhead.NONE,
) -> RowMatmul:
    """y[t, o] = sum_k x[t, k] * W[o, k] as llama.cpp's AVX2 build computes it, W in `repack.group_rows` form.
    `vnni`: Q4_K's sums of a chunk's 8 words (tiled Q6_K's of a sub-block's 4) in a chain of `vpdpbusd`, then
    times the sub-block's scale: the same integers as pmaddubsw, int16 adds and pmaddwd. With 32 vector
    registers Q4_K's GEMM takes tokens in fours (each word decoded once for four). `one_order`: every token in
    one of llama.cpp's orders whatever the batch (Q4_K the GEMV's, Q6_K the tiled matmul's: whole super-blocks'
    integer sums), so that a token's numbers do not depend on its batch. `ask_ahead` (`simd.AskAhead`): how a
    decode step reads the weights, two row groups side by side (PAIRS) or one after another, and whether Q4_K's
    one-token kernel asks for them ahead as well as the hardware prefetcher (on rows of `LONG_ROW` columns or
    more it always does)."""
    lay = SUPER_LAYOUTS[qtype]
    q6 = qtype == Q.Q6_K
    supers = n_in // SUPER_BLOCK
    row_groups = -(-n_out // LANE_ROWS)
    block_tokens = max(TOKENS, LANE_ACTIVATION_BYTES // n_in) // QUAD * QUAD  # quads never straddle blocks
    q4k_quads = not q6 and vector_registers >= 32
    # AVX-512 VNNI: 4-token passes (Q4_K's GEMM, Q6_K's tiled matmul) over two row groups side by side, 16 rows in
    # 512-bit vectors (each lane its row's operations, as in tir_kernels/matmul_llamacpp.py)
    pairs = vnni and vector_registers >= 32
    unit_rows = 2 * LANE_ROWS if pairs else LANE_ROWS
    units = unit_count(row_groups, pairs)  # what the tasks share out: pairs of groups, or groups
    tasks = min(TASKS, units)
    sums_per_super = 16 if q6 else 8  # activation sums per super-block: Q6_K per 16 columns, Q4_K per 32
    # Where one-token passes ask (Q6_K always, Q4_K on long rows) with `AskAhead.NONE` (Zen 4 and x86-64 levels): Q6_K
    # into L1, Q4_K four times as far ahead. First Q6_K into L1 and Q4_K twice as far, Zen 4, copies cycled past the
    # caches, GB/s before / after, 1 thread: Q6_K 2048x8192 24.0 / 30.9, 8192x2048 23.8 / 26.5, 2048x2048 22.9 / 28.3;
    # Q4_K 8192x2048 22.1 / 25.4, 4096x4096 21.4 / 26.9; 2 threads 34.6 / 36.5, 35.5 / 37.3, 36.5 / 37.9; 29.5 / 31.7,
    # 30.3 / 33.5 (Q6_K twice as far: 1 thread alike, 2 threads 1-6% slower; Q4_K into L1: 16.6 and 18.5 at 1 thread).
    # Then Q4_K four times as far, 24 KB (into L2, 1 MB on Zen 4): GB/s at 12 / 24 KB, 1 thread 8192x2048 24.9 / 27.3,
    # 14336x4096 25.4 / 27.7, 4096x14336 28.5 / 30.3, 4096x4096 25.2 / 28.1, 4096x1024 24.8 / 25.9; 2 threads 38.5 /
    # 43.9, 42.5 / 45.1, 29.4 / 30.8, 30.9 / 32.1, 30.0 / 30.2 (8 KB: 18-21 at 1 thread; 16 KB between; 32 and 48 KB
    # level with 24 at 1 thread, up to 7% below it at 2).
    quiet = ask_ahead == AskAhead.NONE
    token_into_l1 = q6 and quiet
    token_ahead = 4 * TOKEN_AHEAD if quiet and not q6 else TOKEN_AHEAD
    # Q4_K's one-token passes that leave the weights to the hardware prefetcher sum a chunk's low and high
    # nibbles in two chains, the high ones masked in place (16 times their codes) and shifted once at the end:
    # no shift per word. Zen 4, copies cycled past the caches, GB/s before / after: 1 thread 8192x2048
    # 27.2 / 28.1, 2048x2048 26.8 / 27.3 (from L3 39.5 / 42.6, 42.4 / 46.6), 2 threads 37.6 / 38.9, 40.0 / 40.8;
    # on long rows, where the kernel asks ahead, 4096x4096 28.8 -> 23.6 (so not there), and a 4-token pass
    # would pay the extra shift and add per token (so not there either).
    nibble_chains = quiet and not q6 and vnni and n_in < LONG_ROW

    def row_bytes(data, gs, at, dtype: str) -> tirx.PrimExpr:
        """The uint8 (or int8) values at `at` of the 8 rows of each group in `gs`, as `dtype` lanes."""
        raw = concat([load(data, g, at, 8) for g in gs])
        if q6:
            raw = tirx.reinterpret(f"int8x{8 * len(gs)}", raw)
        return raw.astype(f"{dtype}x{8 * len(gs)}")

    def word_activations(xq, t, s, c, m: int, lanes: int = LANE_ROWS) -> tirx.PrimExpr:
        """int8 x 4 lanes: token t's activations in columns 4m..4m+3 of chunk c of super-block s, once per row."""
        x4 = tirx.reinterpret("int32", tirx.BufferLoad(xq, [t, tirx.Ramp(s * SUPER_BLOCK + c * CHUNK + 4 * m, 1, 4)]))
        return tirx.reinterpret(f"int8x{4 * lanes}", tirx.Broadcast(x4, lanes))

    def pair_sums(data, gs, base, c, m: int, xq, t, s) -> tirx.PrimExpr:
        """int16, two lanes a row: each row's codes times the activations, columns 4m..4m+3 of chunk c summed in
        pairs, for the rows of the groups in `gs`."""
        xb = word_activations(xq, t, s, c, m, LANE_ROWS * len(gs))
        return _madd("ub", concat([super_word(qtype, data, g, base, c, m) for g in gs]), xb)

    def word_dots(data, gs, base, c, words, xq, t, s) -> tirx.PrimExpr:
        """int32: each row's codes times the activations over the given words of chunk c, one `vpdpbusd` each."""
        lanes = LANE_ROWS * len(gs)
        total = tirx.Broadcast(tirx.const(0, "int32"), lanes)
        for m in words:
            xb = word_activations(xq, t, s, c, m, lanes)
            codes = concat([super_word(qtype, data, g, base, c, m) for g in gs])
            total = vpdpbusd(total, codes, xb)
        return total

    def nibble_dots(data, gs, base, c, xq, t, s) -> tirx.PrimExpr:
        """Q4_K: `word_dots` of all 8 words of chunk c, the same integers: words 0-3 (low nibbles) in one chain,
        words 4-7 in another on their bytes masked with 0xF0 (each product 16 times its code's), that chain's
        sum then shifted right by 4 (exact: a multiple of 16)."""
        lanes = LANE_ROWS * len(gs)
        low = high = tirx.Broadcast(tirx.const(0, "int32"), lanes)
        for m in range(4):
            packed = concat([low_bytes(qtype, data, g, base, c, m) for g in gs])
            low_codes, high_codes = (packed & concat([u8x32(bits)] * len(gs)) for bits in (0x0F, 0xF0))
            low = vpdpbusd(low, low_codes, word_activations(xq, t, s, c, m, lanes))
            high = vpdpbusd(high, high_codes, word_activations(xq, t, s, c, m + 4, lanes))
        return low + (high >> tirx.Broadcast(tirx.const(4, "int32"), lanes))

    def factors(data, gs, at) -> tirx.PrimExpr:
        """The float16 factors at `at` (d, or Q4_K's dmin) of the rows of each group in `gs`, as float32."""
        return concat([halves(data, g, at) for g in gs])

    def scaled(data, gs, at, x_scale, t, s) -> tirx.PrimExpr:
        """float32: the rows' float16 factor at `at` (d, or Q4_K's dmin) times token t's scale of super-block s."""
        return factors(data, gs, at) * tirx.Broadcast(x_scale[t, s], LANE_ROWS * len(gs))

    def chunk_lanes(data, gs, base, c, xq, t, s, one_token=False) -> tirx.PrimExpr:
        """int32 sums of chunk c for the rows of the groups in `gs`: Q4_K one per row (its 8 words' int16 pair
        sums add up without overflow, 8 * 2 * 15 * 127 < 2^15), Q6_K the 8 lanes of each row (lane L of the V
        rows at V L). `one_token`: a one-token pass (`nibble_chains`)."""
        if not q6 and vnni:
            scales = row_bytes(data, gs, base + lay.sub_scales + 8 * c, "int32")
            if one_token and nibble_chains:
                return nibble_dots(data, gs, base, c, xq, t, s) * scales
            return word_dots(data, gs, base, c, range(8), xq, t, s) * scales
        if not q6:
            scales = _pairs_to_int16(row_bytes(data, gs, base + lay.sub_scales + 8 * c, "int16"))
            return _madd("wd", tree_sum([pair_sums(data, gs, base, c, m, xq, t, s) for m in range(8)]), scales)
        lanes = []
        for m in range(8):
            sub = base + lay.sub_scales + 8 * (2 * c + m // 4)
            scales = _pairs_to_int16(row_bytes(data, gs, sub, "int16"))
            lanes.append(_madd("wd", pair_sums(data, gs, base, c, m, xq, t, s), scales))
        return concat(lanes)

    def offsets(data, gs, base, x_sum, t, s, pair=None) -> tirx.PrimExpr:
        """For the rows of the groups in `gs`, Q4_K: sum_j min_j * (activations of sub-block j), j in `pair`
        (sub-blocks 2 pair, 2 pair + 1); Q6_K: lane L's 32 * (scaled sums of 16-blocks 2L, 2L+1), L's rows at
        8 L len(gs)."""
        width = LANE_ROWS * len(gs)

        def term(at, k):
            return row_bytes(data, gs, at, "int32") * tirx.Broadcast(x_sum[t, s * sums_per_super + k], width)

        if not q6:
            return tree_sum([term(base + lay.sub_mins + 8 * j, j) for j in (2 * pair, 2 * pair + 1)])
        lanes = [term(base + lay.sub_scales + 16 * L, 2 * L) + term(base + lay.sub_scales + 16 * L + 8, 2 * L + 1)
                 for L in range(8)]  # fmt: skip
        return concat(lanes) * tirx.Broadcast(tirx.const(32, "int32"), 8 * width)

    chunk_bytes = lay.size // 8  # a super-block's bytes per chunk, on average

    @T.macro
    def stream(data, gs, base, c, into_l1):
        """Ask for the weights AHEAD bytes past chunk c's share of super-block `base` (Q6_K; Q4_K's single
        stream of codes the hardware prefetcher follows, so its one-token kernel asks only with `ask_ahead`
        or on long rows).
        `into_l1`: see `simd.prefetch`; without it (one-token passes) `token_ahead` bytes on, into L1 where
        `token_into_l1` says so."""
        ahead = T.meta_var(AHEAD if into_l1 else token_ahead)
        stream_groups(data, gs, base, c, chunk_bytes, into_l1 or token_into_l1, supers * lay.size, ahead)

    @T.macro
    def q6k_token(y, data, xq, x_scale, x_sum, gs, t, acc, isum, tiled):
        """y[t, rows of the groups in `gs`] by llama.cpp's Q6_K vec_dot, or with `tiled` its tiled matmul, for
        one token: each lane its row's operations (V rows, 16 in 512-bit vectors for two groups). acc, isum:
        lane L of the rows at V L."""
        v = T.meta_var(LANE_ROWS * len(gs))
        acc[T.Ramp(0, 1, 8 * v)] = T.Broadcast(T.float32(0), 8 * v)
        for s in range(supers):
            base = T.meta_var(s * lay.size)
            isum[T.Ramp(0, 1, 8 * v)] = T.Broadcast(T.int32(0), 8 * v)
            for c in range(8):
                stream(data, gs, base, c, into_l1=False)
                isum[T.Ramp(0, 1, 8 * v)] = isum[T.Ramp(0, 1, 8 * v)] + chunk_lanes(data, gs, base, c, xq, t, s)
            isum[T.Ramp(0, 1, 8 * v)] = isum[T.Ramp(0, 1, 8 * v)] - offsets(data, gs, base, x_sum, t, s)
            if tiled:
                total = T.meta_var(tree_sum([isum[T.Ramp(v * L, 1, v)] for L in range(8)]).astype(f"float32x{v}"))
                acc[T.Ramp(0, 1, v)] = fma(
                    factors(data, gs, base) * total, T.Broadcast(x_scale[t, s], v), acc[T.Ramp(0, 1, v)]
                )
            else:
                acc[T.Ramp(0, 1, 8 * v)] = fma(
                    concat([scaled(data, gs, base, x_scale, t, s)] * 8),
                    isum[T.Ramp(0, 1, 8 * v)].astype(f"float32x{8 * v}"),
                    acc[T.Ramp(0, 1, 8 * v)],
                )
        if not tiled:  # hsum_float_8 of each row's lanes
            acc[T.Ramp(0, 1, v)] = lane_sum([acc[T.Ramp(v * L, 1, v)] for L in range(8)])
        store_groups(y, t, gs, n_out, acc, 0)

    @T.macro
    def q4k_token(y, data, xq, x_scale, x_sum, gs, t, acc, isum, tiled):
        """y[t, rows of the groups in `gs`] by llama.cpp's Q4_K GEMV, or with `tiled` its GEMM, for one token
        (V rows). acc: the float sums at 0, mins at V; isum: integer sums (a super-block's sums at 0, mins at V,
        a pair of sub-blocks' at 2 V and 3 V)."""
        v = T.meta_var(LANE_ROWS * len(gs))
        acc[T.Ramp(0, 1, 2 * v)] = T.Broadcast(T.float32(0), 2 * v)
        for s in range(supers):
            base = T.meta_var(s * lay.size)
            scale = T.meta_var(scaled(data, gs, base, x_scale, t, s))
            min_scale = T.meta_var(scaled(data, gs, base + lay.minimum, x_scale, t, s))
            isum[T.Ramp(0, 1, 2 * v)] = T.Broadcast(T.int32(0), 2 * v)
            for p in T.unroll(4):
                if not quiet or n_in >= LONG_ROW:
                    stream(data, gs, base, 2 * p, into_l1=False)
                    stream(data, gs, base, 2 * p + 1, into_l1=False)
                isum[T.Ramp(2 * v, 1, v)] = chunk_lanes(data, gs, base, 2 * p, xq, t, s, True) + chunk_lanes(
                    data, gs, base, 2 * p + 1, xq, t, s, True
                )
                isum[T.Ramp(3 * v, 1, v)] = offsets(data, gs, base, x_sum, t, s, p)
                if tiled:
                    acc[T.Ramp(0, 1, v)] = fma(
                        isum[T.Ramp(2 * v, 1, v)].astype(f"float32x{v}"), scale, acc[T.Ramp(0, 1, v)]
                    )
                    acc[T.Ramp(v, 1, v)] = fma(
                        isum[T.Ramp(3 * v, 1, v)].astype(f"float32x{v}"), min_scale, acc[T.Ramp(v, 1, v)]
                    )
                else:
                    isum[T.Ramp(0, 1, 2 * v)] = isum[T.Ramp(0, 1, 2 * v)] + isum[T.Ramp(2 * v, 1, 2 * v)]
            if not tiled:
                acc[T.Ramp(0, 1, v)] = fma(isum[T.Ramp(0, 1, v)].astype(f"float32x{v}"), scale, acc[T.Ramp(0, 1, v)])
                acc[T.Ramp(v, 1, v)] = fma(
                    isum[T.Ramp(v, 1, v)].astype(f"float32x{v}"), min_scale, acc[T.Ramp(v, 1, v)]
                )
        acc[T.Ramp(0, 1, v)] = acc[T.Ramp(0, 1, v)] - acc[T.Ramp(v, 1, v)]
        store_groups(y, t, gs, n_out, acc, 0)

    @T.macro
    def group_token(y, data, xq, x_scale, x_sum, gs, t, acc, isum, tiled):
        """`q6k_token` or `q4k_token`, by the block type."""
        if q6:
            q6k_token(y, data, xq, x_scale, x_sum, gs, t, acc, isum, tiled)
        else:
            q4k_token(y, data, xq, x_scale, x_sum, gs, t, acc, isum, tiled)

    @T.macro
    def token_rows(y, data, xq, x_scale, x_sum, gs, t, acc, isum, tiled):
        """One token times the rows of the groups in `gs` (`tiled`: see `q6k_token`, `q4k_token`). On AVX-512
        VNNI both groups at once with `AskAhead.PAIRS` (measured on Intel only; Xeon, GB/s from memory, 1
        thread: Q4_K 4096 rows of 14336 columns 14.1 -> 16.0-16.9, 1024 of 4096 14.3 -> 15.4-15.8, Q6_K 14336 of
        4096 13.7 -> 16.5; 2 threads: Q4_K 28.8 -> 30.7, Q6_K 27.2 -> 32.2); else one after the other (a second
        equal to the first: not again). A decode step's tokens do not come here but where `PAIRS` is asked for:
        the body loops over the groups themselves, with one copy of this code (two copies reading alternate
        groups ran at half the speed on Zen 5, Q4_K 2048x8192 from memory: 17.8 against 32.6 GB/s)."""
        if pairs and ask_ahead == AskAhead.PAIRS:
            group_token(y, data, xq, x_scale, x_sum, gs, t, acc, isum, tiled)
        else:
            group_token(y, data, xq, x_scale, x_sum, (gs[0],), t, acc, isum, tiled)
            if len(gs) == 2:
                if gs[1] != gs[0]:
                    group_token(y, data, xq, x_scale, x_sum, (gs[1],), t, acc, isum, tiled)

    def chunk_total(data, gs, base, c, xq, t, s) -> tirx.PrimExpr:
        """Q6_K: int32, each row's sum over chunk c of its codes times token t's activations times the
        sub-block scales (the 8 lanes of `chunk_lanes` added up). Two words of one 16-column sub-block add up
        in int16 before their scale (2 * 2 * 63 * 127 < 2^15)."""
        if vnni:  # each 16-column sub-block's 4 words in one chain
            subs = [base + lay.sub_scales + 8 * (2 * c + h) for h in range(2)]
            sums = [word_dots(data, gs, base, c, range(4 * h, 4 * h + 4), xq, t, s) for h in range(2)]
            return sums[0] * row_bytes(data, gs, subs[0], "int32") + sums[1] * row_bytes(data, gs, subs[1], "int32")
        lanes = []
        for m in range(0, 8, 2):
            sub = base + lay.sub_scales + 8 * (2 * c + m // 4)
            scales = _pairs_to_int16(row_bytes(data, gs, sub, "int16"))
            both = pair_sums(data, gs, base, c, m, xq, t, s) + pair_sums(data, gs, base, c, m + 1, xq, t, s)
            lanes.append(_madd("wd", both, scales))
        return tree_sum(lanes)

    @T.macro
    def q6_tiled_quad(y, data, xq, x_scale, x_sum, gs, t0, acc, isum):
        """y[t0 .. t0+3, rows of the groups in `gs`] by llama.cpp's tiled Q6_K matmul, as q6k_token
        computes it with `tiled`. Only each super-block's integer sum (exact) enters the float operations, so
        here the integers are added in another order: each word's codes are decoded once for the 4 tokens, and
        each token's products go straight into one sum per row. acc: the tokens' accumulators at V u (V: the
        groups' rows); isum: their integer sums at V u, then one token's activation offsets (8 lanes) at 4 V."""
        v = T.meta_var(LANE_ROWS * len(gs))
        acc[T.Ramp(0, 1, v * QUAD)] = T.Broadcast(T.float32(0), v * QUAD)
        for s in range(supers):
            base = T.meta_var(s * lay.size)
            isum[T.Ramp(0, 1, v * QUAD)] = T.Broadcast(T.int32(0), v * QUAD)
            for c in range(8):
                stream(data, gs, base, c, into_l1=True)
                isum[T.Ramp(0, 1, v * QUAD)] = isum[T.Ramp(0, 1, v * QUAD)] + concat(
                    [chunk_total(data, gs, base, c, xq, t0 + u, s) for u in range(QUAD)]
                )
            for u in range(QUAD):
                isum[T.Ramp(v * QUAD, 1, 8 * v)] = offsets(data, gs, base, x_sum, t0 + u, s)
                total = T.meta_var(
                    (
                        isum[T.Ramp(v * u, 1, v)] - tree_sum([isum[T.Ramp(v * QUAD + v * L, 1, v)] for L in range(8)])
                    ).astype(f"float32x{v}")
                )
                acc[T.Ramp(v * u, 1, v)] = fma(
                    factors(data, gs, base) * total, T.Broadcast(x_scale[t0 + u, s], v), acc[T.Ramp(v * u, 1, v)]
                )
        for u in range(QUAD):
            store_groups(y, t0 + u, gs, n_out, acc, v * u)

    @T.macro
    def q4k_tiled_quad(y, data, xq, x_scale, x_sum, gs, t0, acc):
        """y[t0 .. t0+3, rows of the groups in `gs`] by llama.cpp's Q4_K GEMM, as q4k_token computes it
        with `tiled`, the 4 tokens in one loop body so that each word's codes are decoded once for all. acc:
        token u's sums at 2 V u (V: the groups' rows), its mins at 2 V u + V. The pairs of sub-blocks a loop,
        not unrolled: a super-block's 256 `vpdpbusd` in one body spilled a third of its registers (Zen 4, 1
        thread, 128 tokens, 2048x640: 1960 -> 1180 us)."""
        v = T.meta_var(LANE_ROWS * len(gs))
        acc[T.Ramp(0, 1, 2 * v * QUAD)] = T.Broadcast(T.float32(0), 2 * v * QUAD)
        for s in range(supers):
            base = T.meta_var(s * lay.size)
            for p in range(4):
                for u in T.unroll(QUAD):
                    lanes = T.meta_var(
                        chunk_lanes(data, gs, base, 2 * p, xq, t0 + u, s)
                        + chunk_lanes(data, gs, base, 2 * p + 1, xq, t0 + u, s)
                    )
                    acc[T.Ramp(2 * v * u, 1, v)] = fma(
                        lanes.astype(f"float32x{v}"),
                        scaled(data, gs, base, x_scale, t0 + u, s),
                        acc[T.Ramp(2 * v * u, 1, v)],
                    )
                    acc[T.Ramp(2 * v * u + v, 1, v)] = fma(
                        offsets(data, gs, base, x_sum, t0 + u, s, p).astype(f"float32x{v}"),
                        scaled(data, gs, base + lay.minimum, x_scale, t0 + u, s),
                        acc[T.Ramp(2 * v * u + v, 1, v)],
                    )
        for u in T.unroll(QUAD):
            acc[T.Ramp(2 * v * u, 1, v)] = acc[T.Ramp(2 * v * u, 1, v)] - acc[T.Ramp(2 * v * u + v, 1, v)]
            store_groups(y, t0 + u, gs, n_out, acc, 2 * v * u)

    @T.macro
    def decode_task(task, y, data, xq, x_scale, x_sum, n, acc, isum):
        """Task `task`'s row units for fewer than 4 tokens (a decode step), token by token: one group after
        another (see `token_rows`), or with `AskAhead.PAIRS` two side by side."""
        first_unit, task_units = T.meta_var(task_share(task, tasks, units))
        if pairs and ask_ahead == AskAhead.PAIRS:
            for ui in range(task_units):
                gs = T.meta_var(unit_groups(first_unit + ui, row_groups, pairs))
                for t in range(n):
                    token_rows(y, data, xq, x_scale, x_sum, gs, t, acc, isum, q6 and one_order)
        else:
            first, count = T.meta_var(unit_group_range(first_unit, task_units, row_groups, pairs))
            for g in range(first, first + count):
                for t in range(n):
                    group_token(y, data, xq, x_scale, x_sum, (g,), t, acc, isum, q6 and one_order)

    @T.macro
    def block_tokens_rows(gs, first, count, y, data, xq, x_scale, x_sum, n, acc, isum):
        """Tokens first .. first + count - 1 times the rows of the groups in `gs` (4 tokens or more in all)."""
        if q6:
            if n >= 8 or one_order:  # llama.cpp's tiled matmul: tokens in fours share decoded codes
                for q in range(count // QUAD):
                    q6_tiled_quad(y, data, xq, x_scale, x_sum, gs, first + q * QUAD, acc, isum)
                for r in range(count % QUAD):
                    t = T.meta_var(first + count // QUAD * QUAD + r)
                    token_rows(y, data, xq, x_scale, x_sum, gs, t, acc, isum, True)
            else:
                for t in range(first, first + count):
                    token_rows(y, data, xq, x_scale, x_sum, gs, t, acc, isum, False)
        elif one_order:
            for t in range(first, first + count):
                token_rows(y, data, xq, x_scale, x_sum, gs, t, acc, isum, False)
        elif q4k_quads:  # llama.cpp's GEMM but for the batch's last n % 4 tokens (its GEMV)
            for q in range(count // QUAD):
                q4k_tiled_quad(y, data, xq, x_scale, x_sum, gs, first + q * QUAD, acc)
            for r in range(count % QUAD):
                t = T.meta_var(first + count // QUAD * QUAD + r)
                token_rows(y, data, xq, x_scale, x_sum, gs, t, acc, isum, False)
        else:
            for t in range(first, first + count):
                tiled = T.meta_var(t < n - n % 4)
                token_rows(y, data, xq, x_scale, x_sum, gs, t, acc, isum, tiled)

    def token_blocks(task, n, step, args):
        """step(gs, first, count, *args) for task `task`'s units and n tokens in blocks."""
        each_token_block(task, tasks, units, row_groups, pairs, n, block_tokens, step, args)

    @T.macro
    def body(x, data, y, n, capacity):
        xq = T.alloc_buffer((capacity, n_in), "int8")
        x_scale = T.alloc_buffer((capacity, supers), "float32")
        x_sum = T.alloc_buffer((capacity, supers * sums_per_super), "int32")
        quantize_q8_k(x, xq, x_scale, x_sum, n, supers, sums_per_super)
        args = T.meta_var((y, data, xq, x_scale, x_sum, n))
        if n < QUAD:  # each thread its run of tasks: claims cost a decode step more than they save
            for task in T.parallel(tasks):
                acc = T.alloc_buffer((max(64, 2 * QUAD * unit_rows),), "float32")
                isum = T.alloc_buffer(((QUAD + 8) * unit_rows,), "int32")
                decode_task(task, *args, acc, isum)
        else:
            claims = T.alloc_buffer((claim_words(tasks),), "int32")
            clear_claims(claims, tasks)
            for slot in T.parallel(tasks):
                acc = T.alloc_buffer((max(64, 2 * QUAD * unit_rows),), "float32")
                isum = T.alloc_buffer(((QUAD + 8) * unit_rows,), "int32")
                claimed_tasks(slot, tasks, claims, token_blocks, (n, block_tokens_rows, (*args, acc, isum)))

    return RowMatmul(body, n_in, n_out, (row_groups, supers * lay.size))
