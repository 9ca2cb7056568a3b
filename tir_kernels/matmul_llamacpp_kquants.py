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
    TOKENS,
    concat,
    fma,
    halves,
    lane_sum,
    llvm_intrin,
    load,
    prefetch,
    store_rows,
    task_share,
    tree_sum,
    u8x32,
)

Q = GGMLQuantizationType
# Bytes ahead of the chunk being multiplied that each Q6_K chunk asks for, a few lines at a time: its one-token
# kernel read 6.8 GB/s from memory with the hardware prefetcher alone (its codes are two interleaved streams),
# 22-26 GB/s so; the whole next super-blocks asked for at once did not help (6-10 GB/s).
AHEAD = 1536


def super_word(qtype: GGMLQuantizationType, data: tirx.Buffer, g, base, c, m: int) -> tirx.PrimExpr:
    """uint8x32: word m (columns 4m..4m+3) of chunk c of the super-block at byte `base` for the 8 rows of group
    g in `group_rows` form: the unsigned codes (Q4_K 0..15, Q6_K 0..63)."""
    lay = SUPER_LAYOUTS[qtype]
    packed = tirx.BufferLoad(data, [g, tirx.Ramp(base + lay.low + c * 128 + 32 * (m % 4), 1, 32)])
    low = packed & u8x32(15) if m < 4 else packed >> u8x32(4)
    if lay.high is None:
        return low
    bits = tirx.BufferLoad(data, [g, tirx.Ramp(base + lay.high + c * 64 + 32 * (m % 2), 1, 32)]) >> u8x32(2 * (m // 2))
    return low | ((bits & u8x32(3)) << u8x32(4))


def _pairs_to_int16(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """int16x8 scales of 8 rows -> int16x16 with each repeated (the two int16 lanes of a row)."""
    return tirx.Shuffle([v, v], [tirx.IntImm("int32", i // 2) for i in range(16)])


@functools.cache
def kquant_rows(
    qtype: GGMLQuantizationType,
    n_in: int,
    n_out: int,
    vnni: bool = False,
    vector_registers: int = 16,
    one_order: bool = False,
) -> RowMatmul:
    """y[t, o] = sum_k x[t, k] * W[o, k] as llama.cpp's AVX2 build computes it, W in `repack.group_rows` form.
    `vnni`: Q4_K's sums of a chunk's 8 words (tiled Q6_K's of a sub-block's 4) in a chain of `vpdpbusd`, then
    times the sub-block's scale: the same integers as pmaddubsw, int16 adds and pmaddwd. With 32 vector
    registers Q4_K's GEMM takes tokens in fours (each word decoded once for four). `one_order`: every token in
    one of llama.cpp's orders whatever the batch (Q4_K the GEMV's, Q6_K the tiled matmul's: whole super-blocks'
    integer sums), so that a token's numbers do not depend on its batch."""
    lay = SUPER_LAYOUTS[qtype]
    q6 = qtype == Q.Q6_K
    supers = n_in // SUPER_BLOCK
    row_groups = -(-n_out // LANE_ROWS)
    tasks = min(TASKS, row_groups)
    block_tokens = max(TOKENS, LANE_ACTIVATION_BYTES // n_in) // QUAD * QUAD  # quads never straddle blocks
    q4k_quads = not q6 and vector_registers >= 32
    sums_per_super = 16 if q6 else 8  # activation sums per super-block: Q6_K per 16 columns, Q4_K per 32

    def row_bytes(data, g, at, dtype: str) -> tirx.PrimExpr:
        """8 rows' uint8 (or int8) values at `at` as `dtype`x8."""
        raw = load(data, g, at, 8)
        if q6:
            raw = tirx.reinterpret("int8x8", raw)
        return raw.astype(f"{dtype}x8")

    def word_activations(xq, t, s, c, m: int) -> tirx.PrimExpr:
        """int8x32: token t's activations in columns 4m..4m+3 of chunk c of super-block s, once per row."""
        x4 = tirx.reinterpret("int32", tirx.BufferLoad(xq, [t, tirx.Ramp(s * SUPER_BLOCK + c * CHUNK + 4 * m, 1, 4)]))
        return tirx.reinterpret("int8x32", tirx.Broadcast(x4, LANE_ROWS))

    def pairs(data, g, base, c, m: int, xq, t, s) -> tirx.PrimExpr:
        """int16x16: each row's codes times the activations, columns 4m..4m+3 of chunk c summed in pairs."""
        xb = word_activations(xq, t, s, c, m)
        return llvm_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", super_word(qtype, data, g, base, c, m), xb)

    def word_dots(data, g, base, c, words, xq, t, s) -> tirx.PrimExpr:
        """int32x8: each row's codes times the activations over the given words of chunk c, one `vpdpbusd` each."""
        total = tirx.Broadcast(tirx.const(0, "int32"), LANE_ROWS)
        for m in words:
            xb = word_activations(xq, t, s, c, m)
            codes = super_word(qtype, data, g, base, c, m)
            total = llvm_intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", total, codes, xb)
        return total

    def scaled(data, g, at, x_scale, t, s) -> tirx.PrimExpr:
        """float32x8: the rows' float16 factor at `at` (d, or Q4_K's dmin) times token t's scale of super-block s."""
        return halves(data, g, at) * tirx.Broadcast(x_scale[t, s], LANE_ROWS)

    def chunk_lanes(data, g, base, c, xq, t, s) -> tirx.PrimExpr:
        """int32 sums of chunk c: Q4_K one per row (x8; its 8 words' int16 pair sums add up without overflow,
        8 * 2 * 15 * 127 < 2^15), Q6_K the 8 lanes of each row (lane L of 8 rows at 8L)."""
        if not q6 and vnni:
            return word_dots(data, g, base, c, range(8), xq, t, s) * row_bytes(
                data, g, base + lay.sub_scales + 8 * c, "int32"
            )
        if not q6:
            scales = _pairs_to_int16(row_bytes(data, g, base + lay.sub_scales + 8 * c, "int16"))
            return llvm_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", tree_sum([pairs(data, g, base, c, m, xq, t, s)
                                                                          for m in range(8)]), scales)  # fmt: skip
        lanes = []
        for m in range(8):
            sub = base + lay.sub_scales + 8 * (2 * c + m // 4)
            scales = _pairs_to_int16(row_bytes(data, g, sub, "int16"))
            lanes.append(llvm_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs(data, g, base, c, m, xq, t, s), scales))
        return concat(lanes)

    def offsets(data, g, base, x_sum, t, s, pair=None) -> tirx.PrimExpr:
        """Q4_K: sum_j min_j * (activations of sub-block j), j in `pair` (sub-blocks 2 pair, 2 pair + 1);
        Q6_K: lane L's 32 * (scaled sums of 16-blocks 2L, 2L+1)."""

        def term(at, k):
            return row_bytes(data, g, at, "int32") * tirx.Broadcast(x_sum[t, s * sums_per_super + k], LANE_ROWS)

        if not q6:
            return tree_sum([term(base + lay.sub_mins + 8 * j, j) for j in (2 * pair, 2 * pair + 1)])
        lanes = [term(base + lay.sub_scales + 16 * L, 2 * L) + term(base + lay.sub_scales + 16 * L + 8, 2 * L + 1)
                 for L in range(8)]  # fmt: skip
        return concat(lanes) * tirx.Broadcast(tirx.const(32, "int32"), 64)

    chunk_bytes = lay.size // 8  # a super-block's bytes per chunk, on average

    @T.macro
    def stream(data, g, base, c):
        """Ask for the weights AHEAD bytes past chunk c's share of super-block `base` (Q6_K only: Q4_K's single
        stream of codes the hardware prefetcher follows, and asking as well made memory-bound decode slower)."""
        for line in T.unroll(-(-chunk_bytes // 64)):
            T.evaluate(prefetch(data, g, base + AHEAD + c * chunk_bytes + line * 64))

    @T.macro
    def group_times_token(y, data, xq, x_scale, x_sum, g, t, acc, isum, tiled):
        """y[t, g*8 .. g*8+7]; acc: the float accumulators (Q4_K: sums at 0, mins at 8; Q6_K: lane L at 8L),
        isum: integer sums (Q4_K: a super-block's sums at 0, mins at 8, a pair of sub-blocks' at 16 and 24;
        Q6_K: lane L at 8L). `tiled`: the token goes through llama.cpp's Q4_K GEMM (not its GEMV) or its tiled
        Q6_K matmul (not vec_dot)."""
        acc[T.Ramp(0, 1, 64)] = T.Broadcast(T.float32(0), 64)
        for s in range(supers):
            base = T.meta_var(s * lay.size)
            scale = T.meta_var(scaled(data, g, base, x_scale, t, s))
            if q6:
                isum[T.Ramp(0, 1, 64)] = T.Broadcast(T.int32(0), 64)
                for c in range(8):
                    stream(data, g, base, c)
                    isum[T.Ramp(0, 1, 64)] = isum[T.Ramp(0, 1, 64)] + chunk_lanes(data, g, base, c, xq, t, s)
                isum[T.Ramp(0, 1, 64)] = isum[T.Ramp(0, 1, 64)] - offsets(data, g, base, x_sum, t, s)
                if tiled:
                    total = T.meta_var(tree_sum([isum[T.Ramp(8 * L, 1, 8)] for L in range(8)]).astype("float32x8"))
                    acc[T.Ramp(0, 1, 8)] = fma(
                        halves(data, g, base) * total, T.Broadcast(x_scale[t, s], LANE_ROWS), acc[T.Ramp(0, 1, 8)]
                    )
                else:
                    acc[T.Ramp(0, 1, 64)] = fma(
                        concat([scale] * 8), isum[T.Ramp(0, 1, 64)].astype("float32x64"), acc[T.Ramp(0, 1, 64)]
                    )
            else:
                min_scale = T.meta_var(scaled(data, g, base + lay.minimum, x_scale, t, s))
                isum[T.Ramp(0, 1, 16)] = T.Broadcast(T.int32(0), 16)
                for p in T.unroll(4):
                    isum[T.Ramp(16, 1, 8)] = chunk_lanes(data, g, base, 2 * p, xq, t, s) + chunk_lanes(
                        data, g, base, 2 * p + 1, xq, t, s
                    )
                    isum[T.Ramp(24, 1, 8)] = offsets(data, g, base, x_sum, t, s, p)
                    if tiled:
                        acc[T.Ramp(0, 1, 8)] = fma(
                            isum[T.Ramp(16, 1, 8)].astype("float32x8"), scale, acc[T.Ramp(0, 1, 8)]
                        )
                        acc[T.Ramp(8, 1, 8)] = fma(
                            isum[T.Ramp(24, 1, 8)].astype("float32x8"), min_scale, acc[T.Ramp(8, 1, 8)]
                        )
                    else:
                        isum[T.Ramp(0, 1, 16)] = isum[T.Ramp(0, 1, 16)] + isum[T.Ramp(16, 1, 16)]
                if not tiled:
                    acc[T.Ramp(0, 1, 8)] = fma(isum[T.Ramp(0, 1, 8)].astype("float32x8"), scale, acc[T.Ramp(0, 1, 8)])
                    acc[T.Ramp(8, 1, 8)] = fma(
                        isum[T.Ramp(8, 1, 8)].astype("float32x8"), min_scale, acc[T.Ramp(8, 1, 8)]
                    )
        if q6 and not tiled:  # hsum_float_8 of each row's lanes
            acc[T.Ramp(0, 1, 8)] = lane_sum([acc[T.Ramp(8 * L, 1, LANE_ROWS)] for L in range(8)])
        if not q6:
            acc[T.Ramp(0, 1, 8)] = acc[T.Ramp(0, 1, 8)] - acc[T.Ramp(8, 1, 8)]
        store_rows(y, t, g, n_out, acc[T.Ramp(0, 1, 8)], acc, 0)

    def chunk_total(data, g, base, c, xq, t, s) -> tirx.PrimExpr:
        """Q6_K: int32x8, each row's sum over chunk c of its codes times token t's activations times the
        sub-block scales (the 8 lanes of `chunk_lanes` added up). Two words of one 16-column sub-block add up
        in int16 before their scale (2 * 2 * 63 * 127 < 2^15)."""
        if vnni:  # each 16-column sub-block's 4 words in one chain
            subs = [base + lay.sub_scales + 8 * (2 * c + h) for h in range(2)]
            sums = [word_dots(data, g, base, c, range(4 * h, 4 * h + 4), xq, t, s) for h in range(2)]
            return sums[0] * row_bytes(data, g, subs[0], "int32") + sums[1] * row_bytes(data, g, subs[1], "int32")
        lanes = []
        for m in range(0, 8, 2):
            sub = base + lay.sub_scales + 8 * (2 * c + m // 4)
            scales = _pairs_to_int16(row_bytes(data, g, sub, "int16"))
            both = pairs(data, g, base, c, m, xq, t, s) + pairs(data, g, base, c, m + 1, xq, t, s)
            lanes.append(llvm_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", both, scales))
        return tree_sum(lanes)

    @T.macro
    def q6_tiled_quad(y, data, xq, x_scale, x_sum, g, t0, acc, isum):
        """y[t0 .. t0+3, g*8 .. g*8+7] by llama.cpp's tiled Q6_K matmul, as group_times_token computes it
        with `tiled`. Only each super-block's integer sum (exact) enters the float operations, so here the
        integers are added in another order: each word's codes are decoded once for the 4 tokens, and each
        token's products go straight into one sum per row. acc: the tokens' accumulators at 8u; isum: their
        integer sums at 8u, then one token's activation offsets (8 lanes of 8 rows) at 32."""
        acc[T.Ramp(0, 1, 8 * QUAD)] = T.Broadcast(T.float32(0), 8 * QUAD)
        for s in range(supers):
            base = T.meta_var(s * lay.size)
            isum[T.Ramp(0, 1, 8 * QUAD)] = T.Broadcast(T.int32(0), 8 * QUAD)
            for c in range(8):
                stream(data, g, base, c)
                isum[T.Ramp(0, 1, 8 * QUAD)] = isum[T.Ramp(0, 1, 8 * QUAD)] + concat(
                    [chunk_total(data, g, base, c, xq, t0 + u, s) for u in range(QUAD)]
                )
            for u in range(QUAD):
                isum[T.Ramp(32, 1, 64)] = offsets(data, g, base, x_sum, t0 + u, s)
                total = T.meta_var(
                    (isum[T.Ramp(8 * u, 1, 8)] - tree_sum([isum[T.Ramp(32 + 8 * L, 1, 8)] for L in range(8)])).astype(
                        "float32x8"
                    )
                )
                acc[T.Ramp(8 * u, 1, 8)] = fma(
                    halves(data, g, base) * total, T.Broadcast(x_scale[t0 + u, s], LANE_ROWS), acc[T.Ramp(8 * u, 1, 8)]
                )
        for u in range(QUAD):
            store_rows(y, t0 + u, g, n_out, acc[T.Ramp(8 * u, 1, 8)], acc, 8 * u)

    @T.macro
    def q4k_tiled_quad(y, data, xq, x_scale, x_sum, g, t0, acc):
        """y[t0 .. t0+3, g*8 .. g*8+7] by llama.cpp's Q4_K GEMM, as group_times_token computes it with `tiled`,
        the 4 tokens in one loop body so that each word's codes are decoded once for all. acc: token u's sums at
        16u, its mins at 16u + 8."""
        acc[T.Ramp(0, 1, 16 * QUAD)] = T.Broadcast(T.float32(0), 16 * QUAD)
        for s in range(supers):
            base = T.meta_var(s * lay.size)
            for p in T.unroll(4):
                for u in T.unroll(QUAD):
                    lanes = T.meta_var(
                        chunk_lanes(data, g, base, 2 * p, xq, t0 + u, s)
                        + chunk_lanes(data, g, base, 2 * p + 1, xq, t0 + u, s)
                    )
                    acc[T.Ramp(16 * u, 1, 8)] = fma(
                        lanes.astype("float32x8"), scaled(data, g, base, x_scale, t0 + u, s), acc[T.Ramp(16 * u, 1, 8)]
                    )
                    acc[T.Ramp(16 * u + 8, 1, 8)] = fma(
                        offsets(data, g, base, x_sum, t0 + u, s, p).astype("float32x8"),
                        scaled(data, g, base + lay.minimum, x_scale, t0 + u, s),
                        acc[T.Ramp(16 * u + 8, 1, 8)],
                    )
        for u in T.unroll(QUAD):
            acc[T.Ramp(16 * u, 1, 8)] = acc[T.Ramp(16 * u, 1, 8)] - acc[T.Ramp(16 * u + 8, 1, 8)]
            store_rows(y, t0 + u, g, n_out, acc[T.Ramp(16 * u, 1, 8)], acc, 16 * u)

    @T.macro
    def body(x, data, y, n, capacity):
        xq = T.alloc_buffer((capacity, n_in), "int8")
        x_scale = T.alloc_buffer((capacity, supers), "float32")
        x_sum = T.alloc_buffer((capacity, supers * sums_per_super), "int32")
        quantize_q8_k(x, xq, x_scale, x_sum, n, supers, sums_per_super)
        for task in T.parallel(tasks):
            acc = T.alloc_buffer((64,), "float32")
            isum = T.alloc_buffer((8 * QUAD + 64,), "int32")
            first_group, task_groups = T.meta_var(task_share(task, tasks, row_groups))
            for tb in range((n + block_tokens - 1) // block_tokens):
                for gi in range(task_groups):
                    group = T.meta_var(first_group + gi)
                    first = T.meta_var(tb * block_tokens)
                    count = T.meta_var(T.min(n, first + block_tokens) - first)
                    if q6:
                        if n >= 8 or one_order:  # llama.cpp's tiled matmul: tokens in fours share decoded codes
                            for q in range(count // QUAD):
                                q6_tiled_quad(y, data, xq, x_scale, x_sum, group, first + q * QUAD, acc, isum)
                            for r in range(count % QUAD):
                                t = T.meta_var(first + count // QUAD * QUAD + r)
                                group_times_token(y, data, xq, x_scale, x_sum, group, t, acc, isum, True)
                        else:
                            for t in range(first, first + count):
                                group_times_token(y, data, xq, x_scale, x_sum, group, t, acc, isum, False)
                    elif one_order:
                        for t in range(first, first + count):
                            group_times_token(y, data, xq, x_scale, x_sum, group, t, acc, isum, False)
                    elif q4k_quads:  # llama.cpp's GEMM for all but the batch's last n % 4 tokens, its GEMV for those
                        for q in range(count // QUAD):
                            q4k_tiled_quad(y, data, xq, x_scale, x_sum, group, first + q * QUAD, acc)
                        for r in range(count % QUAD):
                            t = T.meta_var(first + count // QUAD * QUAD + r)
                            group_times_token(y, data, xq, x_scale, x_sum, group, t, acc, isum, False)
                    else:
                        for t in range(first, first + count):
                            tiled = T.meta_var(t < n - n % 4)
                            group_times_token(y, data, xq, x_scale, x_sum, group, t, acc, isum, tiled)

    return RowMatmul(body, n_in, n_out, (row_groups, supers * lay.size))
