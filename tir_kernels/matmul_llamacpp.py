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
- RMSNorm, SwiGLU and GeGLU (tir_kernels/norms_activations.py), RoPE (tir_kernels/rope.py) and attention
  (tir_kernels/attention.py) likewise.

The float operations here use explicit fused multiply-adds where ggml has them and plain ones elsewhere:
TVM's LLVM backend fuses a * b + c on its own (it allows FP contraction), which must not happen where ggml
rounds twice, so no kernel here leaves a multiply feeding an add.
"""

from __future__ import annotations

import functools

from gguf import GGMLQuantizationType
from tvm import tirx
from tvm.script import tirx as T

from tir_kernels.activation_quant import quantize_q8_0
from tir_kernels.gguf_blocks import CHUNK
from tir_kernels.matmul_llamacpp_kquants import kquant_rows
from tir_kernels.repack import GROUP_LAYOUTS, LANE_ROWS, SUPER_LAYOUTS
from tir_kernels.row_matmul import RowMatmul
from tir_kernels.simd import (
    LANE_ACTIVATION_BYTES,
    QUAD,
    STREAM_AHEAD,
    TASKS,
    TOKEN_AHEAD,
    TOKENS,
    AskAhead,
    bcast,
    broadcast_as,
    claim_words,
    claimed_tasks,
    clear_claims,
    concat,
    each_row,
    each_token_block,
    fma,
    halves,
    lane_sum,
    llvm_intrin,
    shift_bytes,
    store_groups,
    stream_groups,
    task_share,
    u8x32,
    unit_count,
    unit_group_range,
    unit_groups,
    vpdpbusd,
)

Q = GGMLQuantizationType
L1_ROW_BYTES = 24 * 1024  # a row group's bytes (weights, activations, scales) the word passes read from L1
SEGMENT_BYTES = 8 * 1024  # the bytes of one segment where a row group's are more
# Words of a chunk that one pass over a pair of row groups' chunks takes (32 vector registers): each pass keeps 4
# tokens x words accumulators, independent chains of fused multiply-adds, in registers. Zen 4, 1 thread, 128 tokens
# (us): Q5_0 640x2048 2 words 2250, 1 word 2550; Q4_1 576x1536 1410 / 1520; Q8_0 640x1024 985 / 1170 (4 words: 16
# accumulators, 1 KiB, past what TVM puts on the stack, and slower, 1235 before this order). An Intel Xeon (with the
# accumulators still in the workspace): Q4_1 2 words 78-83 GMAC/s, 1 word 73, 4 words 74; Q5_0 and Q8_0 level.
WORDS_PER_PASS = 2
# Columns from which a one-token pass over one row group at a time asks for its weights ahead even where
# `AskAhead.NONE` leaves them to the hardware prefetcher: there a token's activations crowd L1 (Zen 4, Q8_0, 1
# thread, GB/s without / with asking: 8192x2048 21.0 / 23.2, 14336x1024 20.7 / 24.3; 6144x2048 25.8 / 23.5).
PREFETCHED_ROW = 8192
# A block of tokens whose int8 activations take at most this many bytes (a batched decode step's) asks twice
# STREAM_AHEAD on in its 4-token passes: the first pass over a row group streams its weights from memory with a
# few tokens' work per byte, and Q8_0's wide rows outran the asks (output matrices, 2 threads, ms at 3072 / 6144
# bytes: 49152x576 8 tokens 2.77 / 2.11, 16 tokens 4.03 / 3.19; 262144x640 17.2 / 12.5, 23.6 / 19.3; 32 tokens
# 4-6% faster; Q4_1 1536x576 and Q5_0 2048x640 level at 4 to 32 tokens). Larger blocks' activations fill L1,
# where asking further evicts them (Q8_0 49152x576, 64 tokens, 1 thread: 23.6 -> 24.9 ms).
NEAR_BLOCK_BYTES = 16 * 1024
# Block types whose llama.cpp AVX2 matmul this module (or matmul_llamacpp_kquants.py) reproduces (Q4_0 is repacked
# by llama.cpp into kernels of another order).
EXACT_TYPES = {Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K}
# Block types with a chunk-sum kernel (mlcc's order, `chunk_sum_rows`), and what their codes are offset by as
# unsigned vpdpbusd operands (Q4_1 and Q5_1 have mins instead).
CHUNK_SUM_OFFSETS = {Q.Q4_0: 8, Q.Q4_1: 0, Q.Q5_0: 16, Q.Q5_1: 0, Q.Q8_0: 128}


def group_word(qtype: GGMLQuantizationType, data: tirx.Buffer, g, c, m) -> tirx.PrimExpr:
    """uint8x32: word m (columns 4m..4m+3) of chunk c for the 8 rows of group g in `group_rows` form, as stored:
    the codes before their zero point (Q8_0: the signed bytes). m: an int, or a loop variable unrolled."""
    lay = GROUP_LAYOUTS[qtype]
    gb = lay.group_bytes
    if qtype == Q.Q8_0:
        return tirx.BufferLoad(data, [g, tirx.Ramp(c * gb + lay.codes + 32 * m, 1, 32)])
    # words m and m + 4 are the low and high nibbles of the same bytes
    packed = tirx.BufferLoad(data, [g, tirx.Ramp(c * gb + lay.codes + 32 * (m % 4), 1, 32)])
    codes = shift_bytes(packed, m // 4 * 4, right=True) & u8x32(15)
    if lay.high is not None:  # bit 4: each byte's bit m, moved to bit 4 by rotating 32-bit lanes 4 - m left
        plane = tirx.reinterpret("uint32x8", tirx.BufferLoad(data, [g, tirx.Ramp(c * gb + lay.high, 1, 32)]))
        left = broadcast_as((4 - m) % 32, "uint32", 8)
        right = broadcast_as((m + 28) % 32, "uint32", 8)
        codes = codes | (tirx.reinterpret("uint8x32", (plane << left) | (plane >> right)) & u8x32(16))
    return codes


@functools.cache
def llamacpp_matmul(
    qtype: GGMLQuantizationType,
    n_in: int,
    n_out: int,
    vnni: bool = False,
    vector_registers: int = 16,
    ask_ahead: AskAhead = AskAhead.NONE,
) -> tirx.PrimFunc:
    """`llamacpp_rows`' kernel: llama.cpp's own numbers for a dense layer."""
    return llamacpp_rows(qtype, n_in, n_out, vnni, vector_registers, ask_ahead=ask_ahead).kernel


@functools.cache
def chunk_sum_rows(
    qtype: GGMLQuantizationType, n_in: int, n_out: int, ask_ahead: AskAhead = AskAhead.NONE
) -> RowMatmul:
    """A dense layer in mlcc's order ("gguf-fast") on CPUs with VNNI, W in `group_rows` form: each 32-column
    chunk's 8 words go into one integer sum per row and token (8 `vpdpbusd`, the codes unsigned with their
    offset in the sum's start), scaled into the float accumulator once per chunk instead of once per word.
    1 thread, AVX-512 VNNI, 640x2048, 128 tokens: 110-114 GMAC/s for every type (llama.cpp's order 59-70,
    `int8_rows` 58-60); one token 42-56 (41-54, 45-67). `ask_ahead`: whether a decode step asks for the weights
    ahead (see `llamacpp_rows`)."""
    return llamacpp_rows(qtype, n_in, n_out, vnni=True, sum_chunks=True, ask_ahead=ask_ahead)


@functools.cache
def llamacpp_rows(
    qtype: GGMLQuantizationType,
    n_in: int,
    n_out: int,
    vnni: bool = False,
    vector_registers: int = 16,
    sum_chunks: bool = False,
    ask_ahead: AskAhead = AskAhead.NONE,
) -> RowMatmul:
    """y[t, o] = sum_k x[t, k] * W[o, k] exactly as llama.cpp's AVX2 build computes it, W in
    `tir_kernels.repack.group_rows` form.

    llama.cpp keeps 8 float accumulators per row, lane m summing columns 4m..4m+3 of every block; here 8 rows
    go side by side, so accumulator m holds lane m of 8 rows and each vector operation is, lane for lane, the
    operation llama.cpp does for that row: the same results, with 8 rows' work in one instruction and the
    weights read as one stream. K-quants: `kquant_rows`. `vnni`: each word's integer sums in one `vpdpbusd`
    instead of `pmaddubsw` + `pmaddwd` (the same integers: no pair of products here reaches int16's limit),
    and Q5_0's signed codes w enter it as w + 16, unsigned, with the accumulator starting at -16 times the
    activations' sum over the word's 4 columns (computed once per token): the same integer sums as |w| times
    x with w's sign, without the sign, absolute-value and subtract instructions. `vector_registers`: with 32
    (AVX-512), a pass of 4 tokens over a row group's chunks takes several words at once (`WORDS_PER_PASS`).
    `sum_chunks` (with `vnni`): mlcc's order instead (`chunk_sum_rows`). `ask_ahead` (`simd.AskAhead`): whether
    a decode step's Q4_1 and Q5_0 passes keep two row groups side by side (see `token_pairs`), and for the
    K-quants see `kquant_rows`.

    With AVX-512 VNNI (`vnni` and 32 registers), passes of 4 tokens take two row groups side by side, 16 rows in
    512-bit vectors: each lane still does its row's operations in llama.cpp's order, and `vpdpbusd` on 512 bits
    runs as often per cycle as on 256 (Intel Xeon with AMX, 1 thread, 128 tokens: Q5_0 640x2048 2.99 -> 2.25
    ms, Q8_0 640x1024 1.55 -> 1.05, Q4_1 576x1536 2.07 -> 1.37; the same bits). AVX-512 has no `psign`,
    so Q8_0's codes enter those passes as w + 128.
    """
    if qtype in SUPER_LAYOUTS:
        return kquant_rows(qtype, n_in, n_out, vnni, vector_registers, ask_ahead=ask_ahead)
    lay = GROUP_LAYOUTS[qtype]
    chunks = n_in // CHUNK
    row_groups = -(-n_out // LANE_ROWS)
    gb = lay.group_bytes
    pairs = vnni and vector_registers >= 32 and not sum_chunks  # 4-token passes over two row groups at once
    unit_rows = 2 * LANE_ROWS if pairs else LANE_ROWS  # rows a 4-token pass takes at once
    block_tokens = max(TOKENS, LANE_ACTIVATION_BYTES // n_in)  # tokens that pass over a row group at a time
    # The word passes of four tokens go over the chunks in segments that stay in L1 (weights, activations,
    # scales): all at once where the whole row fits, else segments of about SEGMENT_BYTES, of equal size.
    chunk_bytes = unit_rows // LANE_ROWS * gb + QUAD * (CHUNK + 4 * unit_rows)
    segments = 1 if chunks * chunk_bytes <= L1_ROW_BYTES else -(-chunks * chunk_bytes // SEGMENT_BYTES)
    segment = -(-chunks // segments)
    ones = tirx.Broadcast(tirx.const(1, "int16"), 16)
    zeros = tirx.Broadcast(tirx.const(0, "int32"), LANE_ROWS)
    # Q5_0's codes taken as w + 16 (Q8_0's as w + 128 measured 7% slower in prefill: its decode is one load);
    # in chunk sums every type's codes are unsigned, their offset in each chunk's start
    offset = CHUNK_SUM_OFFSETS[qtype] if sum_chunks else 16 if vnni and qtype == Q.Q5_0 else None
    if pairs and qtype == Q.Q8_0:
        offset = 128
    # Q8_0's codes as w + 128 in one-token passes (decode: 1 thread, 640x262144, 18.1 -> 15.2 ms) and in pairs; in
    # 4-token passes on 256 bits the sign trick measured 7% faster
    token_offset = 128 if vnni and qtype == Q.Q8_0 and not sum_chunks else None
    column_offset = offset or token_offset
    offset_columns = CHUNK if sum_chunks else 4  # activations summed for one offset term
    words = WORDS_PER_PASS if pairs else 1
    # A decode step's passes take one row group at a time, in one loop over the groups (one copy of the code
    # reading one stream of weights): the prefetchers follow it better than two groups side by side, or than two
    # copies of the code taking the groups of a pair in turn (Zen 5, GB/s from memory, 1 thread: Q8_0 640x262144
    # 36 -> 42, Q4_1 576x1536 35 -> 42, Q5_0 640x2048 34 -> 37; Zen 4, Q8_0 23.0 -> 26.2). Q4_1 and Q5_0 keep
    # their pairs but on Zen 5 (`AskAhead.ONE_GROUP`): on Zen 4 Q5_0 640x16384 ran 27.5 GB/s in pairs against 23.4
    # one group at a time (in two copies of the code; one copy not measured there).
    token_pairs = pairs and ask_ahead != AskAhead.ONE_GROUP and qtype != Q.Q8_0
    # One group at a time, `AskAhead.NONE` leaves rows shorter than PREFETCHED_ROW to the hardware prefetcher, as
    # its name says: on Zen 4 asking slowed that one stream (copies cycled past the caches, GB/s without / with, 1
    # thread: Q8_0 640x262144 30.1 / 24.9, 576x49152 30.7 / 25.2, 2048x8192 29.6 / 25.0, 4096x4096 26.4 / 24.7;
    # Q5_0 640x2048 24.2 / 22.7, Q4_1 1536x576 26.7 / 24.7; 2 threads 40.2 / 38.2, 42.5 / 40.3, 51.9 / 45.4, 48.3 /
    # 43.7). Pairs of groups always ask: without it they fell to 10-13 GB/s there.
    quiet_groups = ask_ahead == AskAhead.NONE and n_in < PREFETCHED_ROW
    passes = 8 // words  # word p's pass also takes words p + passes, p + 2 * passes, ...
    units = unit_count(row_groups, pairs)  # what the tasks share out
    tasks = min(TASKS, units)

    def chunk_halves(data, gs, c, at: int) -> tirx.PrimExpr:
        """8 float16 values of chunk c (the rows' scales or mins) of each group in `gs` as float32 lanes."""
        return concat([halves(data, g, c * gb + at) for g in gs])

    def weight_word(data, gs, c, m, offset) -> tuple[tirx.PrimExpr, tirx.PrimExpr | None]:
        """Word m of chunk c for the 8 rows of each group in `gs` as pmaddubsw's unsigned operand, and for
        signed codes the codes whose signs the activations take (|w| times x carrying w's sign, as llama.cpp);
        with `offset` w + offset. m: an int, or a loop variable that unrolling makes one."""
        raw = concat([group_word(qtype, data, g, c, m) for g in gs])
        lanes = 32 * len(gs)
        if qtype != Q.Q8_0:
            if lay.minimum is not None or offset:
                return raw, None  # as they are, or w + offset
            raw = raw - bcast(CHUNK_SUM_OFFSETS[qtype], "uint8", lanes)  # the zero point: 16 for Q5_0, 8 for Q4_0
        elif offset:
            return raw ^ bcast(128, "uint8", lanes), None  # w + 128
        signed = tirx.reinterpret("int8x32", raw)
        absolute = llvm_intrin("int8x32", "llvm.abs.v32i8", signed, tirx.const(0, "bool"))
        magnitude = tirx.reinterpret("uint8x32", absolute)
        return magnitude, signed

    def word_activations(xq, t, c, m, lanes: int) -> tirx.PrimExpr:
        """int8 x 4 lanes: token t's int8 activations in columns 4m..4m+3 of chunk c, once per row."""
        x4 = tirx.reinterpret("int32", tirx.BufferLoad(xq, [t, tirx.Ramp(c * CHUNK + 4 * m, 1, 4)]))
        return tirx.reinterpret(f"int8x{4 * lanes}", tirx.Broadcast(x4, lanes))

    def word_sums(data, gs, c, m, xq, t, one_token: bool = False) -> tirx.PrimExpr:
        """int32 x 8 rows per group in `gs`: each row's sum of columns 4m..4m+3 of chunk c times token t's int8
        activations there. xq: the activations, and with an offset their offset terms."""
        xq, x_offset = xq
        lanes = LANE_ROWS * len(gs)
        xb = word_activations(xq, t, c, m, lanes)
        word_offset = token_offset if one_token and token_offset else offset
        operand, signs = weight_word(data, gs, c, m, word_offset)
        if signs is not None:
            xb = llvm_intrin("int8x32", "llvm.x86.avx2.psign.b", xb, signs)
        if vnni:
            start = tirx.Broadcast(x_offset[t, c * 8 + m], lanes) if word_offset else bcast(0, "int32", lanes)
            return vpdpbusd(start, operand, xb)
        pairs = llvm_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", operand, xb)
        return llvm_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, ones)

    def chunk_sum(data, gs, c, xq, t) -> tirx.PrimExpr:
        """int32x8: each row's sum of chunk c times token t's int8 activations (`sum_chunks`), in two chains
        of 4 `vpdpbusd` (words 0..3 starting at the chunk's offset term, words 4..7 at 0)."""
        xq, x_offset = xq
        chains = []
        for half in range(2):
            total = tirx.Broadcast(x_offset[t, c], LANE_ROWS) if offset and half == 0 else zeros
            for m in range(4 * half, 4 * half + 4):
                operand, xb = weight_word(data, gs, c, m, offset)[0], word_activations(xq, t, c, m, LANE_ROWS)
                total = vpdpbusd(total, operand, xb)
            chains.append(total)
        return chains[0] + chains[1]

    def rows(buf, at, lanes: int = LANE_ROWS) -> tirx.PrimExpr:
        return tirx.BufferLoad(buf, [tirx.Ramp(at, 1, lanes)])

    def lane_total(acc, at, lanes: int = LANE_ROWS) -> tirx.PrimExpr:
        """The rows' sums in acc[at ..]: llama.cpp's 8 lanes added as hsum_float_8 does, or the chunk sums."""
        if sum_chunks:
            return rows(acc, at)
        return lane_sum([rows(acc, at + m * lanes, lanes) for m in range(8)])

    def chunk_sums(data, gs, c, xq, t) -> tirx.PrimExpr:
        """float32 x 8 words x the groups' rows: words 0..7 of chunk c, each row's integer sums (its lane m)."""
        lanes = LANE_ROWS * len(gs)
        return concat([word_sums(data, gs, c, m, xq, t, one_token=True).astype(f"float32x{lanes}") for m in range(8)])

    def chunk_scale(data, gs, c, x_scale, t) -> tirx.PrimExpr:
        """float32 x 8 words x the groups' rows: each row's d_w * d_x for chunk c, for all 8 words."""
        return concat([chunk_halves(data, gs, c, 0) * tirx.Broadcast(x_scale[t, c], LANE_ROWS * len(gs))] * 8)

    @T.macro
    def stream_ahead(data, gs, c, into_l1, part=0, parts=1, distance=None):
        """Ask for the weights of each group in `gs` `distance` bytes past chunk c (4-token passes: STREAM_AHEAD
        or twice that, see `NEAR_BLOCK_BYTES`; `simd.prefetch`); without `into_l1` (one-token passes) TOKEN_AHEAD
        bytes. Of the chunk's cache lines only every `parts`th from `part` on: the word passes share the asking
        (one pass with all of it ran 70 instructions a chunk, the others 50)."""
        ahead = T.meta_var(2 * STREAM_AHEAD if into_l1 else TOKEN_AHEAD)
        stream_groups(data, gs, 0, c, gb, into_l1, chunks * gb, ahead, part, parts, distance)

    @T.macro
    def group_times_token(y, data, xq, x_scale, x_sum, gs, t, acc):
        """y[t, rows of the groups in `gs`] for one token (decode, and a block's last n % 4): all 8 words of a
        chunk at once, lane m's accumulator of the rows at acc[V m] (V: the groups' rows), the mins' sums at
        acc[8 V]: 8 independent chains."""
        v = T.meta_var(LANE_ROWS * len(gs))
        acc[T.Ramp(0, 1, 9 * v)] = T.Broadcast(T.float32(0), 9 * v)
        for c in range(chunks):
            if len(gs) == 2 or not quiet_groups:
                stream_ahead(data, gs, c, into_l1=False)
            if sum_chunks:
                acc[T.Ramp(0, 1, LANE_ROWS)] = fma(
                    chunk_halves(data, gs, c, 0) * T.Broadcast(x_scale[t, c], LANE_ROWS),
                    chunk_sum(data, gs, c, xq, t).astype("float32x8"),
                    acc[T.Ramp(0, 1, LANE_ROWS)],
                )
            else:
                acc[T.Ramp(0, 1, 8 * v)] = fma(
                    chunk_scale(data, gs, c, x_scale, t), chunk_sums(data, gs, c, xq, t), acc[T.Ramp(0, 1, 8 * v)]
                )
            if lay.minimum is not None:
                acc[T.Ramp(8 * v, 1, v)] = fma(
                    chunk_halves(data, gs, c, lay.minimum), T.Broadcast(x_sum[t, c], v), acc[T.Ramp(8 * v, 1, v)]
                )
        total = T.meta_var(lane_total(acc, 0, v))
        result = T.meta_var(total + acc[T.Ramp(8 * v, 1, v)] if lay.minimum is not None else total)
        acc[T.Ramp(0, 1, v)] = result
        store_groups(y, t, gs, n_out, acc, 0)

    @T.macro
    def word_step(data, xq, gs, t0, count, live, scales, c, p, distance):
        """Chunk c into the pass's accumulators `live` (word p + w * passes of token i at [w, i]) of `count`
        tokens; the passes share asking for the weights `distance` bytes on."""
        lanes = T.meta_var(LANE_ROWS * len(gs))
        stream_ahead(data, gs, c, True, p, passes, distance)
        for w in T.unroll(words):
            for i in T.unroll(count):
                live[T.Ramp((w * count + i) * lanes, 1, lanes)] = fma(
                    rows(scales, (i * chunks + c) * lanes, lanes),
                    word_sums(data, gs, c, p + w * passes, xq, t0 + i).astype(f"float32x{lanes}"),
                    rows(live, (w * count + i) * lanes, lanes),
                )

    @T.macro
    def swap_pass(acc, live, count, p, lanes, into_live: bool):
        """Pass p's accumulators between `acc` ([count, 9, rows]) and `live` ([words, count, rows])."""
        for w in T.unroll(words):
            for i in T.unroll(count):
                if into_live:
                    live[T.Ramp((w * count + i) * lanes, 1, lanes)] = rows(acc, (i * 9 + p + w * passes) * lanes, lanes)
                else:
                    acc[T.Ramp((i * 9 + p + w * passes) * lanes, 1, lanes)] = rows(live, (w * count + i) * lanes, lanes)

    @T.macro
    def group_times_tokens(y, data, xq, x_scale, x_sum, gs, t0, count, acc, live, scales, distance):
        """y[t0 .. t0+count, g*8 .. g*8+7] for each group g in `gs` (rows past n_out not stored; a second
        group equal to the first not at all). llama.cpp keeps, per row and token, 8 float accumulators (lane m
        sums columns 4m..4m+3 of every block) and the min terms; here word m (with `words` > 1, words m,
        m + passes, ...) is one pass over the chunks in which each of the `count` tokens' lane-m accumulators
        of the groups' rows takes each chunk in turn, so a word's codes are decoded once for all tokens.
        acc: [count, 9, rows] (lanes, then mins), scales: [count, chunks, rows] the rows' d_w * d_x; live: a
        pass's accumulators, small enough for the stack (`acc` is a workspace, which LLVM cannot tell from the
        other buffers: it kept the accumulators in registers but stored them at every chunk).

        Where a row group's weights and activations do not stay in L1 for 8 passes (4096 columns of Q4_1: 20
        KB of weights and 16 KB of activations; 68 -> 40 GMAC/s), the passes go over one segment of chunks
        after the other (each accumulator still takes the chunks in order). A row that fits keeps its single
        loop nest: the segment loop around it measured ~4% slower on SmolLM2's batch-8 decode. The weights are
        asked for `distance` bytes ahead (`stream_ahead`)."""
        lanes = T.meta_var(LANE_ROWS * len(gs))
        for c in range(chunks):  # each chunk's d_w converted once for the tokens
            for i in T.unroll(count):
                scales[T.Ramp((i * chunks + c) * lanes, 1, lanes)] = chunk_halves(data, gs, c, 0) * T.Broadcast(
                    x_scale[t0 + i, c], lanes
                )
        if sum_chunks:
            for i in T.unroll(count):
                acc[T.Ramp(i * 9 * LANE_ROWS, 1, LANE_ROWS)] = T.Broadcast(T.float32(0), LANE_ROWS)
            for c in range(chunks):
                stream_ahead(data, gs, c, True, distance=distance)
                for i in T.unroll(count):
                    acc[T.Ramp(i * 9 * LANE_ROWS, 1, LANE_ROWS)] = fma(
                        rows(scales, (i * chunks + c) * LANE_ROWS),
                        chunk_sum(data, gs, c, xq, t0 + i).astype("float32x8"),
                        rows(acc, i * 9 * LANE_ROWS),
                    )
        elif segments == 1:
            for p in T.unroll(passes):
                live[T.Ramp(0, 1, words * count * lanes)] = T.Broadcast(T.float32(0), words * count * lanes)
                for c in range(chunks):
                    word_step(data, xq, gs, t0, count, live, scales, c, p, distance)
                swap_pass(acc, live, count, p, lanes, into_live=False)
        else:
            for i in T.unroll(count):
                for m in T.unroll(8):
                    acc[T.Ramp((i * 9 + m) * lanes, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
            for part in range(segments):
                for p in T.unroll(passes):
                    swap_pass(acc, live, count, p, lanes, into_live=True)
                    for step in range(T.min(segment, chunks - part * segment)):
                        word_step(data, xq, gs, t0, count, live, scales, part * segment + step, p, distance)
                    swap_pass(acc, live, count, p, lanes, into_live=False)
        for i in T.unroll(count):
            acc[T.Ramp((i * 9 + 8) * lanes, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
            if lay.minimum is not None:
                for c in range(chunks):
                    acc[T.Ramp((i * 9 + 8) * lanes, 1, lanes)] = fma(
                        chunk_halves(data, gs, c, lay.minimum),
                        T.Broadcast(x_sum[t0 + i, c], lanes),
                        rows(acc, (i * 9 + 8) * lanes, lanes),
                    )
            # hsum_float_8 for each row, then the mins; the rows go out through the mins' (spent) accumulator
            at = T.meta_var((i * 9 + 8) * lanes)
            total = T.meta_var(lane_total(acc, i * 9 * lanes, lanes))
            result = T.meta_var(total + rows(acc, at, lanes) if lay.minimum is not None else total)
            acc[T.Ramp(at, 1, lanes)] = result
            store_groups(y, t0 + i, gs, n_out, acc, at)

    @T.macro
    def block_tokens_rows(gs, first, count, y, data, activations, x_scale, x_sum, n, buffers):
        """Tokens first .. first + count - 1 times the rows of the groups in `gs`, in fours (the first four
        streaming the weights in, asking further ahead for a block of few tokens: `NEAR_BLOCK_BYTES`), then one
        at a time."""
        acc, single, live, scales = T.meta_var(buffers)
        distance: T.let[T.int32] = T.if_then_else(count * n_in <= NEAR_BLOCK_BYTES, 2 * STREAM_AHEAD, STREAM_AHEAD)
        for q in range(count // QUAD):
            quad = T.meta_var(first + q * QUAD)
            group_times_tokens(y, data, activations, x_scale, x_sum, gs, quad, QUAD, acc, live, scales, distance)
        for r in range(count % QUAD):
            t = T.meta_var(first + count // QUAD * QUAD + r)
            group_times_token(y, data, activations, x_scale, x_sum, gs, t, single)

    def token_blocks(task, n, step, args):
        """step(gs, first, count, *args) for task `task`'s units and n tokens in blocks."""
        each_token_block(task, tasks, units, row_groups, pairs, n, block_tokens, step, args)

    @T.macro
    def token_task(task, y, data, activations, x_scale, x_sum, n, single):
        """Task `task`'s row units for fewer than 4 tokens (a decode step), one token at a time."""
        first_unit, task_units = T.meta_var(task_share(task, tasks, units))
        if token_pairs:
            for ui in range(task_units):
                gs = T.meta_var(unit_groups(first_unit + ui, row_groups, pairs))
                for t in range(n):
                    group_times_token(y, data, activations, x_scale, x_sum, gs, t, single)
        else:
            first, count = T.meta_var(unit_group_range(first_unit, task_units, row_groups, pairs))
            for g in range(first, first + count):
                for t in range(n):
                    group_times_token(y, data, activations, x_scale, x_sum, (g,), t, single)

    @T.macro
    def body(x, data, y, n, capacity):
        xq = T.alloc_buffer((capacity, n_in), "int8")
        x_scale = T.alloc_buffer((capacity, chunks), "float32")  # float16 d of the block, as float32
        x_sum = T.alloc_buffer((capacity, chunks), "float32")  # float16 d * sum(q) (Q8_1's s)
        quantize_q8_0(x, xq, x_scale, x_sum, n, chunks)
        x_offset = T.alloc_buffer((capacity, n_in // offset_columns) if bool(column_offset) else (1, 1), "int32")
        if bool(column_offset):
            column_offsets(xq, x_offset, n, n_in // offset_columns, offset_columns, column_offset)
        activations = T.meta_var((xq, x_offset))
        # Row groups (with `pairs`, pairs of them) in `tasks` ranges, which the threads claim in prefill
        if n >= QUAD:
            claims = T.alloc_buffer((claim_words(tasks),), "int32")
            clear_claims(claims, tasks)
            for slot in T.parallel(tasks):
                acc = T.alloc_buffer((QUAD * 9 * unit_rows,), "float32")
                single = T.alloc_buffer((9 * unit_rows,), "float32")
                live = T.alloc_buffer((words * QUAD * unit_rows,), "float32")
                scales = T.alloc_buffer((QUAD * chunks * unit_rows,), "float32")
                buffers = T.meta_var((acc, single, live, scales))
                args = T.meta_var((y, data, activations, x_scale, x_sum, n, buffers))
                claimed_tasks(slot, tasks, claims, token_blocks, (n, block_tokens_rows, args))
        else:  # a decode step's tokens one at a time, without `acc` and `scales` (over 1 KiB: a workspace call
            # per task each, ~7% of SmolLM2's decode step at 1 thread); each thread its run of tasks, unclaimed
            for task in T.parallel(tasks):
                single = T.alloc_buffer((9 * unit_rows,), "float32")
                token_task(task, y, data, activations, x_scale, x_sum, n, single)

    return RowMatmul(body, n_in, n_out, (row_groups, chunks * gb))


def _int_sum(values: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    return functools.reduce(lambda a, b: a + b, [v.astype("int32") for v in values])


@T.macro
def _row_offsets(t, xq, x_offset, count: int, columns: int, offset: int):
    for w in range(count):
        x_offset[t, w] = -offset * _int_sum([xq[t, columns * w + k] for k in range(columns)])


@T.macro
def column_offsets(xq, x_offset, n, count: int, columns: int, offset: int):
    """x_offset[t, w] = -offset * (sum of token t's int8 activations in columns w * columns .. + columns)."""
    each_row(n, _row_offsets, (xq, x_offset, count, columns, offset))
