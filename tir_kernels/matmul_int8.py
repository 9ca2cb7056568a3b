"""GGUF matmuls with 8-bit activations for x86 CPUs with AVX2 in mlcc's summation order ("gguf-fast").

Each token's activations are quantized per 32 columns to int8 with one float scale (llama.cpp's Q8_0/Q8_1
activations). A weight row is read 32 columns at a time as 32 small integers (its block's codes, unpacked in
registers), multiplied with the int8 activations by `pmaddubsw` + `pmaddwd` (32 multiply-adds in two
instructions), and the int32 sums are scaled into a float accumulator. That is 4-5x fewer instructions per
weight than decoding to float, which is what bounds decode speed on a CPU.

Per 32-column chunk c of a row, a type gives its codes and how to scale their dot product:
    dot_c = scale_c * x_scale_c * sum_i code_i * xq_i  [+ offset_c * x_sum_c]
Codes with a zero point (Q4_0, Q5_0, Q8_0, Q6_K) are made signed and multiplied with the sign trick
(|code| times xq with code's sign), like llama.cpp; types with a min (Q4_1, Q5_1, Q4_K, Q5_K) keep unsigned
codes and add min * sum(x). Q6_K's two 16-column sub-scales ride in `pmaddwd`'s multiplier.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from gguf import GGMLQuantizationType
from tvm import tirx
from tvm.script import tirx as T

from tir_kernels.activation_quant import quantize_mlcc
from tir_kernels.gguf_blocks import CHUNK, CHUNK_DECODERS, Chunk
from tir_kernels.repack import INTERLEAVED, LANE_ROWS, InterleavedLayout
from tir_kernels.row_matmul import RowMatmul
from tir_kernels.simd import (
    LANE_ACTIVATION_BYTES,
    STREAM_AHEAD,
    TASKS,
    TOKENS,
    bcast,
    concat,
    each_chunk_line,
    halves,
    llvm_intrin,
    load,
    prefetch,
    row_sums,
    span,
    splat,
    task_share,
    tree_sum,
)

Q = GGMLQuantizationType
PREFETCH_ROWS = 4  # rows ahead to prefetch
ACTIVATION_BLOCK_BYTES = 128 * 1024  # int8 activations a task's rows pass over at a time (L2-resident)
GROUP = 8  # chunks summed in registers between accumulator updates (a K-quant super-block)

# Types with 256-column super-blocks and integer sub-block scales: their activations are quantized per 256
# columns (llama.cpp's Q8_K) and a super-block's 8 chunks are summed as integers before one float scale.
SUPER_BLOCK_TYPES = {Q.Q4_K, Q.Q5_K, Q.Q6_K}
# Types whose codes are below 32 with the zero point as an offset: 4 `pmaddubsw` results add up in int16
# without overflow (4 * 2 * 31 * 127 < 2^15), so 8 rows' chunks reduce in integers (see int8_matmul).
ROW_LANE_TYPES = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K}


@dataclass
class ScratchRows:
    """8 rows unpacked into local buffers (words [c, m, r], scales/offsets/sub-block scales [c, r])."""

    words: tirx.Buffer
    scales: tirx.Buffer
    offsets: tirx.Buffer
    multipliers: tirx.Buffer

    def word(self, c, m: int) -> tirx.PrimExpr:
        return tirx.reinterpret("uint8x32", load(self.words, 0, (c * 8 + m) * LANE_ROWS, LANE_ROWS))

    def scale(self, c) -> tirx.PrimExpr:
        return load(self.scales, 0, c * LANE_ROWS, LANE_ROWS)

    def offset(self, c) -> tirx.PrimExpr:
        return load(self.offsets, 0, c * LANE_ROWS, LANE_ROWS)

    def multiplier(self, c) -> tirx.PrimExpr:
        return tirx.reinterpret("int16x16", load(self.multipliers, 0, c * LANE_ROWS, LANE_ROWS))


@dataclass
class InterleavedRows:
    """Row group g of weights in an InterleavedLayout, decoded in registers."""

    data: tirx.Buffer
    group: tirx.PrimExpr
    layout: InterleavedLayout

    def _half8(self, c, at: int) -> tirx.PrimExpr:
        return halves(self.data, self.group, c * self.layout.group_bytes + at)

    def word(self, c, m: int) -> tirx.PrimExpr:
        lay = self.layout
        packed = load(self.data, self.group, c * lay.group_bytes + lay.codes + 32 * (m % 4), 32)
        code = packed & bcast(15, "uint8", 32) if m < 4 else packed >> bcast(4, "uint8", 32)
        if lay.high is None:
            return code
        plane = load(self.data, self.group, c * lay.group_bytes + lay.high, 32)
        moved = plane << bcast(4 - m, "uint8", 32) if m <= 4 else plane >> bcast(m - 4, "uint8", 32)
        return code | (moved & bcast(16, "uint8", 32))

    def scale(self, c) -> tirx.PrimExpr:
        return self._half8(c, 0)

    def offset(self, c) -> tirx.PrimExpr:
        if self.layout.minimum is not None:
            return self._half8(c, self.layout.minimum)
        return self.scale(c) * tirx.Broadcast(tirx.const(-self.layout.zero, "float32"), LANE_ROWS)

    def words(self, c) -> tirx.PrimExpr:
        """All 8 words of chunk c as int32x64 (for a store into ScratchRows.words)."""
        return concat([tirx.reinterpret("int32x8", self.word(c, m)) for m in range(8)])


def chunk_dot(ch: Chunk, xq: tirx.PrimExpr) -> tirx.PrimExpr:
    """int32x8 partial sums of codes (minus the zero point) times 32 int8 activations."""
    if ch.zero:  # signed codes: |q| (unsigned) times the activations carrying q's sign
        signed = tirx.reinterpret("int8x32", ch.codes - bcast(ch.zero, "uint8", 32))
        absolute = llvm_intrin("int8x32", "llvm.abs.v32i8", signed, tirx.const(0, "bool"))
        magnitude = tirx.reinterpret("uint8x32", absolute)
        pairs = llvm_intrin(
            "int16x16",
            "llvm.x86.avx2.pmadd.ub.sw",
            magnitude,
            llvm_intrin("int8x32", "llvm.x86.avx2.psign.b", xq, signed),
        )
    else:
        pairs = llvm_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", ch.codes, xq)
    multiplier = ch.sub_scales if ch.sub_scales is not None else bcast(1, "int16", 16)
    return llvm_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, multiplier)


@dataclass
class ActivationStats:
    """Per-token, per-chunk scale and sum of the int8 activations, stored both token-major (one token's
    chunks are contiguous: the one-token path) and chunk-major (a chunk's tokens are one vector: tiles)."""

    by_token: tirx.Buffer  # [tokens, 2, chunks]
    by_chunk: tirx.Buffer  # [2, chunks, tokens]

    def _load(self, which: int, c, t0, tokens: int) -> tirx.PrimExpr:
        if tokens == 1:
            return tirx.BufferLoad(self.by_token, [t0, which, c])
        return tirx.BufferLoad(self.by_chunk, [which, c, tirx.Ramp(t0, 1, tokens)])

    def scale(self, c, t0, tokens: int) -> tirx.PrimExpr:
        return self._load(0, c, t0, tokens)

    def sum(self, c, t0, tokens: int) -> tirx.PrimExpr:
        return self._load(1, c, t0, tokens)


@functools.cache
def int8_matmul(
    qtype: GGMLQuantizationType, n_in: int, n_out: int, row_bytes: int, interleaved: bool = False
) -> tirx.PrimFunc:
    """y[t, o] = sum_k x[t, k] * W[o, k] with W as GGUF blocks and x quantized to int8 per 32 columns;
    `interleaved`: W in the InterleavedLayout of its type (`interleave_rows`)."""
    return int8_rows(qtype, n_in, n_out, row_bytes, interleaved).kernel


@functools.cache
def int8_rows(
    qtype: GGMLQuantizationType, n_in: int, n_out: int, row_bytes: int, interleaved: bool = False
) -> RowMatmul:
    """`int8_matmul`'s body, for the dense kernel and the grouped expert kernel alike."""
    decode = CHUNK_DECODERS[qtype]
    super_block = qtype in SUPER_BLOCK_TYPES
    chunks = n_in // CHUNK
    groups, tail = divmod(chunks, GROUP)
    row_tasks = min(TASKS, n_out)
    lines_per_row = -(-row_bytes // 64)
    tile_group = max(1, min(16, ACTIVATION_BLOCK_BYTES // (TOKENS * n_in)))
    row_lanes = qtype in ROW_LANE_TYPES
    row_groups = -(-n_out // LANE_ROWS)
    lane_tasks = min(TASKS, row_groups)
    block_tokens = max(TOKENS, LANE_ACTIVATION_BYTES // n_in)
    data_shape = (row_groups, row_bytes * LANE_ROWS) if interleaved else (n_out, row_bytes)
    layout = INTERLEAVED.get(qtype)
    chunk_bytes = row_bytes * LANE_ROWS // chunks  # one chunk of 8 interleaved rows

    def scale_count(count: int) -> int:
        """Float scales per group of `count` chunks: one per chunk, or one per super-block."""
        return 1 if super_block else count

    def chunk_scales(data, o, stats, t0, tokens, first, count):
        """The `count` chunks' scales times each token's, as one vector (tokens fastest): one multiply per
        chunk (per super-block), and the kernel's per-token factors become broadcast loads."""
        return concat(
            [
                splat(decode(data, o, first + j).scale, tokens) * stats.scale(first + j, t0, tokens)
                for j in range(scale_count(count))
            ]
        )

    def group_dot(data, o, xq, stats, scales, slot, t0, tokens, first, count):
        """float32x(8 * tokens) partial sums of `count` chunks from `first` for tokens t0.., as one expression
        tree: no memory round trips between chunks, independent chains for the CPU to overlap, and each
        chunk's codes decoded once for all the tokens. A super-block's chunks are summed as integers."""
        per_token = [[] for _ in range(tokens)]
        for j in range(count):
            c = first + j
            ch = decode(data, o, c)
            for u in range(tokens):
                xv = tirx.BufferLoad(xq, [t0 + u, tirx.Ramp(c * CHUNK, 1, CHUNK)])
                per_token[u].append(chunk_dot(ch, xv))
        sums = []
        for u in range(tokens):
            terms = []
            for j, dot in enumerate([tree_sum(per_token[u])] if super_block else per_token[u]):
                if tokens > 1:  # the product is ready in `scales`
                    scale = tirx.Broadcast(tirx.BufferLoad(scales, [slot, j * tokens + u]), 8)
                else:
                    c = first if super_block else first + j
                    scale = tirx.Broadcast(decode(data, o, c).scale * stats.scale(c, t0, 1), 8)
                terms.append(dot.astype("float32x8") * scale)
            sums.append(tree_sum(terms))
        return concat(sums)

    def group_offset(data, o, stats, t0, tokens, first, count):
        """float32x(tokens): the min/offset terms of `count` chunks from `first`, for all tokens at once
        (a chunk's sums over consecutive tokens are one vector)."""
        offsets = [decode(data, o, first + j).offset for j in range(count)]
        if all(off is None for off in offsets):
            return splat(0.0, tokens)
        terms = [
            splat(off, tokens) * stats.sum(first + j, t0, tokens) for j, off in enumerate(offsets) if off is not None
        ]
        return tree_sum(terms)

    def lane_words(data, o, c):
        """Row o's codes of chunk c as 8 words of 4 columns (word m: columns 4m..4m+3)."""
        return tirx.reinterpret("int32x8", decode(data, o, c).codes)

    def lane_multiplier(data, o, c):
        """Row o's integer sub-block scale of chunk c, twice in one word (`pmaddwd` multiplies pairs)."""
        scale = decode(data, o, c).sub_scales.value.astype("int32")
        return scale | (scale << 16)

    def lane_dot(xq, stats, rows, t, first, count):
        """float32x8: 8 rows' (lanes) dot products over `count` chunks from `first` with token t. Word m of
        a chunk holds the 8 rows' columns 4m..4m+3 and multiplies the token's 4 int8 activations there
        broadcast to all rows; 4 such products add in int16 and `pmaddwd` finishes the rows' sums, so the
        float work is per 8 rows, not per row. A super-block's chunks are summed as integers. `rows` gives
        the 8 rows' words, scales, offsets and sub-block scales (ScratchRows or InterleavedRows)."""
        sums = []
        for j in range(count):
            c = first + j
            halves = []
            for h in range(2):
                pairs = []
                for m in range(4 * h, 4 * h + 4):
                    x4 = tirx.reinterpret("int32", load(xq, t, c * CHUNK + 4 * m, 4))
                    xb = tirx.reinterpret("int8x32", tirx.Broadcast(x4, LANE_ROWS))
                    pairs.append(llvm_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", rows.word(c, m), xb))
                halves.append(tree_sum(pairs))
            mult = rows.multiplier(c) if super_block else bcast(1, "int16", 16)
            sums.append(tree_sum([llvm_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", half, mult) for half in halves]))
        if super_block:
            sums = [tree_sum(sums)]
        terms = []
        for j, dot in enumerate(sums):
            c = first + j
            terms.append(dot.astype("float32x8") * (rows.scale(c) * tirx.Broadcast(stats.scale(c, t, 1), LANE_ROWS)))
        for j in range(count):
            c = first + j
            terms.append(rows.offset(c) * tirx.Broadcast(stats.sum(c, t, 1), LANE_ROWS))
        return tree_sum(terms)

    @T.macro
    def rows_times_tokens(y, data, xq, stats, o, t0, tokens, acc, off, scales, slot):
        """y[t0 : t0 + tokens, o], accumulating in acc[slot, 8 * tokens] and off[slot, tokens]; the group's
        scales go through scales[slot, GROUP * tokens]."""
        a = T.meta_var(span(8 * tokens))
        b = T.meta_var(span(tokens))
        zeros_a = T.meta_var(splat(0.0, 8 * tokens))
        zeros_b = T.meta_var(splat(0.0, tokens))
        acc[slot, a] = zeros_a
        off[slot, b] = zeros_b
        for g in range(groups):
            if tokens > 1:
                scales[slot, span(scale_count(GROUP) * tokens)] = chunk_scales(
                    data, o, stats, t0, tokens, g * GROUP, GROUP
                )
            vec = T.meta_var(group_dot(data, o, xq, stats, scales, slot, t0, tokens, g * GROUP, GROUP))
            shift = T.meta_var(group_offset(data, o, stats, t0, tokens, g * GROUP, GROUP))
            acc[slot, a] = acc[slot, a] + vec
            off[slot, b] = off[slot, b] + shift
        if tail > 0:
            if tokens > 1:
                scales[slot, span(scale_count(tail) * tokens)] = chunk_scales(
                    data, o, stats, t0, tokens, groups * GROUP, tail
                )
            vec = T.meta_var(group_dot(data, o, xq, stats, scales, slot, t0, tokens, groups * GROUP, tail))
            shift = T.meta_var(group_offset(data, o, stats, t0, tokens, groups * GROUP, tail))
            acc[slot, a] = acc[slot, a] + vec
            off[slot, b] = off[slot, b] + shift
        if tokens == TOKENS:  # the tokens' lane sums as one vector
            off[slot, b] = off[slot, b] + row_sums([acc[slot, T.Ramp(u * 8, 1, 8)] for u in range(tokens)])
        else:
            for u in range(tokens):
                for i in range(8):
                    off[slot, u] = off[slot, u] + acc[slot, u * 8 + i]
        for u in range(tokens):
            y[t0 + u, o] = off[slot, u]

    @T.macro
    def prefetch_ahead(data, o):
        """Weights stream from memory: ask for a later row early."""
        if o + PREFETCH_ROWS < n_out:
            for line in range(lines_per_row):
                hint = T.meta_var(prefetch(data, o + PREFETCH_ROWS, line * 64))
                T.evaluate(hint)

    @T.macro
    def unpack_lanes(data, g, words, row_scale, row_offset, row_multiplier):
        """Rows g*8 .. g*8+7 (the last row repeated past n_out) with lanes = rows: word m of row r's chunk c
        goes to lane r of words[c, m]; scales, offsets and sub-block scales to lane r of [c]."""
        for r in range(LANE_ROWS):
            for c in range(chunks):
                o = T.meta_var(T.min(g * LANE_ROWS + r, n_out - 1))
                words[0, T.Ramp(c * 8 * LANE_ROWS + r, LANE_ROWS, 8)] = lane_words(data, o, c)
                row_scale[0, c * LANE_ROWS + r] = decode(data, o, c).scale
                off = T.meta_var(decode(data, o, c).offset)
                row_offset[0, c * LANE_ROWS + r] = off
                if super_block:
                    row_multiplier[0, c * LANE_ROWS + r] = lane_multiplier(data, o, c)

    @T.macro
    def unpack_interleaved(source, words, row_scale, row_offset):
        """An interleaved row group's decoded words, scales and offsets into the local buffers."""
        for c in range(chunks):
            words[0, T.Ramp(c * 8 * LANE_ROWS, 1, 8 * LANE_ROWS)] = source.words(c)
            row_scale[0, T.Ramp(c * LANE_ROWS, 1, LANE_ROWS)] = source.scale(c)
            row_offset[0, T.Ramp(c * LANE_ROWS, 1, LANE_ROWS)] = source.offset(c)

    @T.macro
    def ask_line(at, data, g):
        T.evaluate(prefetch(data, g, STREAM_AHEAD + at))

    @T.macro
    def lanes_times_token(y, xq, stats, rows, acc, g, t, data, stream):
        """y[t, g*8 .. g*8+7] (rows past n_out are not stored). `stream`: `rows` are interleaved weights read
        from memory, chunk by chunk, each asking for the bytes STREAM_AHEAD further on (the hardware
        prefetcher alone left the loads waiting on DRAM: Q4_1 576x1536 took 74 us instead of 47)."""
        lanes = T.meta_var(T.Ramp(0, 1, LANE_ROWS))
        acc[0, lanes] = T.Broadcast(T.float32(0), LANE_ROWS)
        if stream:
            for c in range(chunks):
                # exact lines on rows of any length here (Q4_0 1536x576, 2048x640: level with the old asks)
                each_chunk_line(c, chunk_bytes, True, lambda at: ask_line(at, data, g))
                acc[0, lanes] = acc[0, lanes] + lane_dot(xq, stats, rows, t, c, 1)
        else:
            for grp in range(groups):
                acc[0, lanes] = acc[0, lanes] + lane_dot(xq, stats, rows, t, grp * GROUP, GROUP)
            if tail > 0:
                acc[0, lanes] = acc[0, lanes] + lane_dot(xq, stats, rows, t, groups * GROUP, tail)
        if g * LANE_ROWS + LANE_ROWS <= n_out:
            y[t, T.Ramp(g * LANE_ROWS, 1, LANE_ROWS)] = acc[0, lanes]
        else:
            for r in range(LANE_ROWS):
                if g * LANE_ROWS + r < n_out:
                    y[t, g * LANE_ROWS + r] = acc[0, r]

    @T.macro
    def lane_task(y, data, xq, stats, n, task):
        lane_acc = T.alloc_buffer((1, LANE_ROWS), "float32")
        first_group, task_groups = T.meta_var(task_share(task, lane_tasks, row_groups))
        if n >= TOKENS:  # (the unpacked rows' buffers are workspace calls: prefill only)
            words = T.alloc_buffer((1, chunks * 8 * LANE_ROWS), "int32")
            row_scale = T.alloc_buffer((1, chunks * LANE_ROWS), "float32")
            row_offset = T.alloc_buffer((1, chunks * LANE_ROWS), "float32")
            row_multiplier = T.alloc_buffer((1, chunks * LANE_ROWS), "int32")
            scratch = T.meta_var(ScratchRows(words, row_scale, row_offset, row_multiplier))
            for tb in range((n + block_tokens - 1) // block_tokens):
                for gi in range(task_groups):
                    g = T.meta_var(first_group + gi)
                    if interleaved:
                        unpack_interleaved(InterleavedRows(data, g, layout), words, row_scale, row_offset)
                    else:
                        unpack_lanes(data, g, words, row_scale, row_offset, row_multiplier)
                    for t in range(tb * block_tokens, T.min(n, (tb + 1) * block_tokens)):
                        lanes_times_token(y, xq, stats, scratch, lane_acc, g, t, data, False)
        elif interleaved:
            for gi in range(task_groups):
                g = T.meta_var(first_group + gi)
                for t in range(n):
                    lanes_times_token(y, xq, stats, InterleavedRows(data, g, layout), lane_acc, g, t, data, True)

    @T.macro
    def body(x, data, y, n, capacity):
        xq = T.alloc_buffer((capacity, n_in), "int8")
        by_token = T.alloc_buffer((capacity, 2, chunks), "float32")  # each token's chunk scales, then sums
        by_chunk = T.alloc_buffer((2, chunks, capacity), "float32")  # the same, chunk-major: vectors over tokens
        stats = T.meta_var(ActivationStats(by_token, by_chunk))
        quantize_mlcc(x, xq, by_token, by_chunk, n, n_in, super_block)
        # Rows are split into TASKS contiguous ranges run in parallel, each with its accumulators allocated
        # here (inside the parallel loop each would cost a workspace call). Tokens go TOKENS at a time
        # (sharing each chunk's decoded codes), the last tile ending at the last token (overlapping the one
        # before); a task's rows pass over `tile_group` tiles at a time, whose activations stay in L2.
        # Fewer than TOKENS tokens (decode) go one by one.
        tiles = T.meta_var(T.if_then_else(n >= TOKENS and not row_lanes, (n + TOKENS - 1) // TOKENS, 0))
        if not interleaved:
            acc = T.alloc_buffer((TASKS, 8 * TOKENS), "float32")
            off = T.alloc_buffer((TASKS, TOKENS), "float32")
            scales = T.alloc_buffer((TASKS, GROUP * TOKENS), "float32")
            for task in T.parallel(row_tasks):
                first_row, task_rows = T.meta_var(task_share(task, row_tasks, n_out))
                for tg in range((tiles + tile_group - 1) // tile_group):
                    for i in range(task_rows):
                        o = T.meta_var(first_row + i)
                        if tg == 0:
                            prefetch_ahead(data, o)
                        for tt in range(tile_group):
                            if tg * tile_group + tt < tiles:
                                t0 = T.meta_var(T.min((tg * tile_group + tt) * TOKENS, n - TOKENS))
                                rows_times_tokens(y, data, xq, stats, o, t0, TOKENS, acc, off, scales, task)
                if n < TOKENS:
                    for i in range(task_rows):
                        o = T.meta_var(first_row + i)
                        prefetch_ahead(data, o)
                        for t in range(n):
                            rows_times_tokens(y, data, xq, stats, o, t, 1, acc, off, scales, task)
        # ROW_LANE_TYPES: 8 rows at a time with lanes = rows (lane_dot). Prefill unpacks a task's row group
        # into local buffers once for up to `block_tokens` tokens; interleaved weights are already in that
        # order, and decode (fewer tokens) reads them as they are.
        if row_lanes:
            if interleaved:
                for task in T.parallel(lane_tasks):
                    lane_task(y, data, xq, stats, n, task)
            else:
                if n >= TOKENS:
                    for task in T.parallel(lane_tasks):
                        lane_task(y, data, xq, stats, n, task)

    return RowMatmul(body, n_in, n_out, data_shape)
