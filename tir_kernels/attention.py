"""Faster CPU attention kernels for TVM's paged KV cache: decode, prefill against the cache, and prefill of
the new tokens among themselves (ragged).

TVM 0.27's CPU kernels walk one (sequence, head) at a time on one thread, with scalar loops and a softmax
rescale of the whole output row after every key; at a context of a few hundred tokens decode attention costs
as much as all the model's matmuls. These keep TVM's signatures and arithmetic (online softmax in base 2)
but run in parallel (prefill: a token's query heads that share a KV head, so each K/V row is read once for
all of them; decode: each query head, or the query heads of a KV head, their keys split over the threads for
K.q where they are fewer than the threads), score 8 keys at a time with their dot products accumulated side by
side in vector registers, take exp2 with vector instructions, and rescale once per 16 keys.

mlcc's caches apply RoPE when K is appended (or the model applies it), never inside attention, so the kernel
reads K as stored and ignores `rotary_mode`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from tvm import DataType, tirx
from tvm.relax.frontend.nn.llm._kernel_common import _declare_length_info, _get_kv_chunk_len, _get_seq_offset
from tvm.script import tirx as T

from tir_kernels.ggml_math import v_expf
from tir_kernels.numerics import Numerics
from tir_kernels.simd import LANES, fma, hsum8, lane_sum, lanes_of, prefetch, row_sums, tree_sum

TILE = 16  # cached tokens scored per softmax update
# Decode attention asks for the K and V rows of the key this many keys ahead, into L2: a KV head's rows come 16
# to a page (4 KB), the next page's elsewhere, and the hardware prefetcher stops at the end of each; into L1 its
# few fill buffers held the rest back. Reading one KV head's K of 30 x 3000 tokens (AMD Zen 4, 1 thread), GB/s:
# 12.7 as it was, 19.3 asking 4 pages ahead into L2, 10.3 into L1 (37 for the same bytes in one piece).
ROWS_AHEAD = 32
SLOT_SUM_BYTES = 32768  # room for one-token P.V's slot sums, per task (L1)
# Decode takes the query heads of a KV head in one task (`decode_task_heads`) with this many sequences times KV
# heads, or a context this long: else a task per query head, which spreads a short context's few tasks better
# over the threads (SmolLM2, 3 KV heads, at 2 threads and 16 tokens of context: 3 tasks ran ~5% slower than 9).
SHARED_TASKS = 4
SHARED_LENGTH = 256
# Decode in llama.cpp's order splits each task's keys over the threads for K.q from a context this long where
# its tasks would leave a quarter or more of the threads' time idle (SmolLM2's 3 KV heads on 2 threads, or any
# model with fewer KV heads than threads). One KV head of 128 at 4000 keys, 30 layers, 2 threads: 7.1 -> 5.2-5.5
# ms (SmolLM2's heads at 2000 keys on 2 threads: level, 3.3-3.6 ms).
SPLIT_LENGTH = 512
EMPTY_LSE = -5e4  # the log-sum-exp of no keys, as TVM's kernels leave it: its merge weight is exactly 0
LOG2E = math.log2(math.e)
DECODE_SYMBOL = "batch_decode_paged_kv_cpu"
PAGED_PREFILL_SYMBOL = "batch_prefill_paged_kv_cpu"
RAGGED_PREFILL_SYMBOL = "batch_prefill_ragged_kv"  # the CPU pipeline only ever sees TVM's CPU variant


def _seen(span: tirx.PrimExpr, length, query_range, g) -> tirx.PrimExpr:
    """Which of the key positions `span` query g of an _attend call sees: all below `length`, or its range."""
    if query_range is None:
        return span < tirx.Broadcast(length, LANES)
    lo, hi = query_range(g)
    return tirx.And(span >= tirx.Broadcast(lo, LANES), span < tirx.Broadcast(hi, LANES))


@T.macro(hygienic=False)
def _score_octet(keys, spots, spot, row, dim, width, softcap, into, at):
    """into[row, at : at + LANES]: the base-2 scores (soft-capped) of the 8 keys at spots[spot[0], spot[1] + j]
    against query row `row` of keys.q_scaled, each key's dot in `_chains` chains of `width` elements: the same
    bits wherever computed."""
    chains = T.meta_var(_chains(dim, width))
    dots = T.alloc_buffer((LANES, width), "float32")  # 8 keys' partial dots
    for j in T.unroll(LANES):
        dots[j, T.Ramp(0, 1, width)] = T.Broadcast(T.float32(0), width)
    for c in range(dim // (width * chains)):
        for j in T.unroll(LANES):
            loc = T.meta_var(spots[spot[0], spot[1] + j])
            for i in T.unroll(chains):
                d = T.meta_var((c * chains + i) * width)
                dots[j, T.Ramp(0, 1, width)] = fma(
                    _key_part(keys, loc, d, width),
                    keys.q_scaled[row, T.Ramp(d, 1, width)],
                    dots[j, T.Ramp(0, 1, width)],
                )
    folded = T.meta_var([_fold(dots[j, T.Ramp(0, 1, width)]) for j in range(LANES)])
    into[row, T.Ramp(at, 1, LANES)] = _soft_cap(row_sums(folded), softcap)


@T.macro(hygienic=False)
def _attend(first, heads, length, keys, scores, state, out, where, dim, softcap, query_range, width, scored=None):
    """Online softmax (base 2) of `heads` queries that share their keys (the query heads of one KV head, or
    one query) over `length` keys, 16 keys per rescale; rows `first .. first + heads` of the scratch buffers.

    keys.locate(i): where key i is stored; keys.k_rows[*keys.key_index(loc), d]: element d of that key;
    keys.values(loc, d, width): `width` elements of its value from d. Dot products and output rows accumulate
    `width` elements at a time (`attention_width`) in registers, several independent chains at a time (one
    chain is bound by the latency of its fused multiply-adds). As TVM's kernels, the running sum starts with a
    phantom 1 at score -5e4 that vanishes once a real score arrives.
    softcap: scores (natural units) become softcap * tanh(score / softcap) first (Gemma 2); 0 for none.
    query_range: None, or g -> (lo, hi), the keys query g sees (a range within the `length`): the keys outside
    it score -inf, and a tile wholly outside it leaves the query's state and output exactly as they were.
    scored: None, or rows of the queries' scores of every key, computed already (_split_decode)."""
    chains = T.meta_var(_chains(dim, width))
    for g in range(heads):
        state[first + g, 0] = T.float32(-5e4)  # running max
        state[first + g, 1] = T.float32(1)  # running sum
    for tile in range((length + TILE - 1) // TILE):
        for r in range(TILE):  # keys past the end repeat the last one (scored -inf below, so weight 0)
            where[first, r] = keys.locate(T.min(tile * TILE + r, length - 1))
            if isinstance(keys, (PagedKeys, StagedKeys)):  # the cache's pages (see ROWS_AHEAD)
                ahead = T.meta_var(keys.locate(T.min(tile * TILE + r + ROWS_AHEAD, length - 1)))
                if scored is None:
                    keys.ask_key(ahead, dim)
                keys.ask_values(ahead, 0, dim)
        if isinstance(keys, StagedKeys):  # the tile's rows widened once, then found by their place in it
            for r in range(TILE):
                for c in range(dim // width):
                    at = T.meta_var(c * width)
                    keys.k_rows[keys.task, r, T.Ramp(at, 1, width)] = _key_part(keys.cache, where[first, r], at, width)
                    keys.v_rows[keys.task, r, T.Ramp(at, 1, width)] = keys.cache.values(where[first, r], at, width)
                where[first, r] = r
        for g in range(heads):
            state[first + g, 2] = state[first + g, 0]  # the tile's new max
            for part in range(TILE // LANES):
                at = T.meta_var(part * LANES)
                if scored is None:
                    _score_octet(keys, where, (first, at), first + g, dim, width, softcap, scores, at)
                valid = T.meta_var(_seen(T.Ramp(tile * TILE + at, 1, LANES), length, query_range, g))
                sums = T.meta_var(
                    scores[first + g, T.Ramp(at, 1, LANES)]
                    if scored is None
                    else scored[first + g, T.Ramp(tile * TILE + at, 1, LANES)]
                )
                scores[first + g, T.Ramp(at, 1, LANES)] = T.Select(valid, sums, T.Broadcast(T.float32(-1e30), LANES))
            parts = T.meta_var([scores[first + g, T.Ramp(i * LANES, 1, LANES)] for i in range(TILE // LANES)])
            state[first + g, 2] = T.max(state[first + g, 0], _lane_reduce(functools.reduce(tirx.max, parts), tirx.max))
            state[first + g, 3] = T.exp2(state[first + g, 0] - state[first + g, 2])  # rescale of the past
            for i in range(TILE // LANES):
                row = T.meta_var(T.Ramp(i * LANES, 1, LANES))
                scores[first + g, row] = _exp2(scores[first + g, row] - T.Broadcast(state[first + g, 2], LANES))
            weights = T.meta_var(
                tree_sum([scores[first + g, T.Ramp(i * LANES, 1, LANES)] for i in range(TILE // LANES)])
            )
            state[first + g, 1] = state[first + g, 1] * state[first + g, 3] + _lane_reduce(weights, _add)
            state[first + g, 0] = state[first + g, 2]
        for block in range(dim // (width * chains)):
            for pair in range(heads // 2):  # two heads at a time: 2 x chains accumulators, each value read once
                _weigh_values(first + 2 * pair, 2, keys, scores, state, out, where, first, block, chains, width)
            if heads % 2 == 1:
                _weigh_values(first + heads - 1, 1, keys, scores, state, out, where, first, block, chains, width)


@T.macro(hygienic=False)
def _weigh_values(slot, count: int, keys, scores, state, out, where, first, block, chains: int, width: int):
    """Queries slot .. slot + count (one or two): their outputs' dims (block * chains ..) * width rescaled,
    then the tile's values weighted in, `count * chains` independent accumulator chains."""
    acc = T.alloc_buffer((count * chains, width), "float32")
    for g in T.unroll(count):
        for u in T.unroll(chains):
            acc[g * chains + u, T.Ramp(0, 1, width)] = out[
                slot + g, T.Ramp((block * chains + u) * width, 1, width)
            ] * T.Broadcast(state[slot + g, 3], width)
    for r in T.unroll(TILE):
        for u in T.unroll(chains):
            value = T.meta_var(keys.values(where[first, r], (block * chains + u) * width, width))
            for g in T.unroll(count):
                weight = T.meta_var(T.Broadcast(scores[slot + g, r], width))
                acc[g * chains + u, T.Ramp(0, 1, width)] = fma(weight, value, acc[g * chains + u, T.Ramp(0, 1, width)])
    for g in T.unroll(count):
        for u in T.unroll(chains):
            out[slot + g, T.Ramp((block * chains + u) * width, 1, width)] = acc[g * chains + u, T.Ramp(0, 1, width)]


@T.macro(hygienic=False)
def _ggml_score(keys, loc, q16, acc, total, dim, sm_scale, vec_kq):
    """total[0] = K[loc] . q16 * sm_scale in ggml_vec_dot_f16's order (`vec_kq`) or tinyBLAS's."""
    if vec_kq:
        for j in range(4):
            acc[j, T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
        for step in range(dim // 32):
            for j in T.unroll(4):
                key = T.meta_var(_key(keys, loc, step * 32 + j * LANES))
                query = T.meta_var(q16[T.Ramp(step * 32 + j * LANES, 1, LANES)])
                acc[j, T.Ramp(0, 1, LANES)] = fma(key, query, acc[j, T.Ramp(0, 1, LANES)])
        wide = T.alloc_buffer((1,), "float64")
        wide[0] = T.Cast("float64", _f16_dot_reduce([acc[j, T.Ramp(0, 1, LANES)] for j in range(4)]))
        for d in range(dim // 32 * 32, dim):  # leftovers, in float64
            wide[0] = wide[0] + T.Cast("float64", _key_at(keys, loc, d) * q16[d])
        total[0] = T.Cast("float32", wide[0]) * sm_scale
    else:
        acc[0, T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
        for step in range(dim // LANES):
            key = T.meta_var(_key(keys, loc, step * LANES))
            acc[0, T.Ramp(0, 1, LANES)] = fma(key, q16[T.Ramp(step * LANES, 1, LANES)], acc[0, T.Ramp(0, 1, LANES)])
        total[0] = hsum8(acc[0, T.Ramp(0, 1, LANES)]) * sm_scale


@T.macro(hygienic=False)
def _ggml_softmax(probs, slot, length, peak, weight, at):
    """probs[slot, :length] (scores, their maximum peak[at]) to ggml's soft_max probabilities rounded to float16:
    ggml_v_expf 8 at a time, summed in float64 (weight[at]), scaled by the sum's float inverse. Its results
    under float32's normals are 0 here (`flush_tiny`): float16 rounds them to 0 and the float64 sum, which
    holds the peak's 1, loses them either way (a random-weight 1B Llama's decode: softmax ~20% -> 2% of the
    attention kernel's time)."""
    weight[at] = T.float64(0)
    for c in range((length + LANES - 1) // LANES):
        span = T.meta_var(T.Ramp(c * LANES, 1, LANES))
        valid = T.meta_var(span < T.Broadcast(length, LANES))
        exps = T.meta_var(v_expf(probs[slot, span] - T.Broadcast(peak[at], LANES), flush_tiny=True))
        probs[slot, span] = T.Select(valid, exps, T.Broadcast(T.float32(0), LANES))
        weight[at] = weight[at] + T.Cast("float64", hsum8(probs[slot, span]))
    inverse = T.meta_var(T.Cast("float32", T.float64(1) / weight[at]))
    for c in range((length + LANES - 1) // LANES):
        span = T.meta_var(T.Ramp(c * LANES, 1, LANES))
        probs[slot, span] = (probs[slot, span] * T.Broadcast(inverse, LANES)).astype("float16x8").astype("float32x8")


@T.macro(hygienic=False)
def _attend_ggml_pair(q, row, head, keys, length, sm_scale, output, lse, dim, probs, slot):
    """_attend_ggml in tinyBLAS's order (a batch of several tokens) for query heads `head` and `head` + 1 of one
    KV head, their scores in probs[slot] and probs[slot + 1]: each key and value vector is read once for
    both heads (one head at a time streamed K and V from L2 for every query head), each head's chains and
    additions exactly as _attend_ggml's."""
    q16 = T.decl_buffer((2, dim), "float32")
    dots = T.decl_buffer((8, LANES), "float32")  # K.q partial sums: head h, key j at 4 h + j
    sums = T.decl_buffer((2 * LANES, LANES), "float32")  # P.V: head h, element j at 8 h + j
    score = T.alloc_buffer((1,), "float32")
    peak = T.alloc_buffer((2,), "float32")
    weight = T.alloc_buffer((2,), "float64")
    where = T.alloc_buffer((4,), "int32")
    for h, d in T.grid(2, dim):
        q16[h, d] = T.Cast("float32", T.Cast("float16", T.Cast("float32", q[row, head + h, d])))
    for h in range(2):
        peak[h] = T.float32(-3.0e38)
    for quad in range(length // 4):
        for j in T.unroll(4):
            where[j] = keys.locate(quad * 4 + j)
            for h in T.unroll(2):
                dots[4 * h + j, T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
        for step in range(dim // LANES):
            for j in T.unroll(4):
                key = T.meta_var(_key(keys, where[j], step * LANES))
                for h in T.unroll(2):
                    dots[4 * h + j, T.Ramp(0, 1, LANES)] = fma(
                        key, q16[h, T.Ramp(step * LANES, 1, LANES)], dots[4 * h + j, T.Ramp(0, 1, LANES)]
                    )
        for h in T.unroll(2):
            for j in T.unroll(4):
                probs[slot + h, quad * 4 + j] = hsum8(dots[4 * h + j, T.Ramp(0, 1, LANES)]) * sm_scale
                peak[h] = T.max(peak[h], probs[slot + h, quad * 4 + j])
    for i in range(length // 4 * 4, length):
        for h in range(2):
            head_q16 = T.decl_buffer((dim,), "float32", data=q16.data, elem_offset=h * dim)
            _ggml_score(keys, keys.locate(i), head_q16, dots, score, dim, sm_scale, False)
            probs[slot + h, i] = score[0]
            peak[h] = T.max(peak[h], score[0])
    for h in range(2):
        _ggml_softmax(probs, slot + h, length, peak, weight, h)
    for block in range(dim // LANES):
        for j in T.unroll(2 * LANES):
            sums[j, T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
        for c in range((length + LANES - 1) // LANES):
            for j in T.unroll(LANES):
                value = T.meta_var(keys.values_by_dim(block * LANES + j, c * LANES))
                for h in T.unroll(2):
                    sums[LANES * h + j, T.Ramp(0, 1, LANES)] = fma(
                        probs[slot + h, T.Ramp(c * LANES, 1, LANES)], value, sums[LANES * h + j, T.Ramp(0, 1, LANES)]
                    )
        for h in range(2):
            output[row, head + h, T.Ramp(block * LANES, 1, LANES)] = _hsum8_each(
                [sums[LANES * h + j, T.Ramp(0, 1, LANES)] for j in range(LANES)]
            )
    for h in range(2):
        lse[row, head + h] = peak[h] * T.float32(LOG2E) + T.log2(T.Cast("float32", weight[h]))


@T.macro(hygienic=False)
def _attend_ggml(q, row, head, keys, length, sm_scale, output, lse, dim, probs, slot):
    """llama.cpp's attention without flash attention (CPU, AVX2) for one query head of a batch of several
    tokens (one token: _attend_ggml_heads): K.q with q rounded to float16 (K and V are stored rounded) in
    tinyBLAS's order (8 lanes) or, where tinyBLAS declines (a head size not a multiple of 8),
    ggml_vec_dot_f16's; softmax of the scaled scores with ggml's vector exp summed 8 at a time in float64,
    probabilities rounded to float16, then P.V in tinyBLAS's order. probs[slot]: room for the scores of
    `length` keys rounded up to 8."""
    q16 = T.decl_buffer((dim,), "float32")
    dots = T.decl_buffer((4, LANES), "float32")  # K.q partial sums
    score = T.alloc_buffer((1,), "float32")
    peak = T.alloc_buffer((1,), "float32")
    weight = T.alloc_buffer((1,), "float64")
    where = T.alloc_buffer((4,), "int32")
    for d in range(dim):
        q16[d] = T.Cast("float32", T.Cast("float16", T.Cast("float32", q[row, head, d])))
    peak[0] = T.float32(-3.0e38)
    # tinyBLAS's order, one 8-lane chain per key: 4 keys side by side so their chains overlap
    quads = T.meta_var(length // 4 if dim % LANES == 0 else 0)
    for quad in range(quads):
        for j in T.unroll(4):
            where[j] = keys.locate(quad * 4 + j)
            dots[j, T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
        for step in range(dim // LANES):
            for j in T.unroll(4):
                dots[j, T.Ramp(0, 1, LANES)] = fma(
                    _key(keys, where[j], step * LANES),
                    q16[T.Ramp(step * LANES, 1, LANES)],
                    dots[j, T.Ramp(0, 1, LANES)],
                )
        for j in T.unroll(4):
            probs[slot, quad * 4 + j] = hsum8(dots[j, T.Ramp(0, 1, LANES)]) * sm_scale
            peak[0] = T.max(peak[0], probs[slot, quad * 4 + j])
    for i in range(quads * 4, length):
        _ggml_score(keys, keys.locate(i), q16, dots, score, dim, sm_scale, dim % LANES != 0)
        probs[slot, i] = score[0]
        peak[0] = T.max(peak[0], score[0])
    _ggml_softmax(probs, slot, length, peak, weight, 0)
    # tinyBLAS's order: lane l of element d's chain takes keys 8c + l; 8 elements' chains side by side
    for block in range(dim // LANES):
        sums = T.alloc_buffer((LANES, LANES), "float32", scope="local")
        for j in T.unroll(LANES):
            sums[j, T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
        for c in range((length + LANES - 1) // LANES):
            weights = T.meta_var(probs[slot, T.Ramp(c * LANES, 1, LANES)])
            for j in T.unroll(LANES):
                sums[j, T.Ramp(0, 1, LANES)] = fma(
                    weights, keys.values_by_dim(block * LANES + j, c * LANES), sums[j, T.Ramp(0, 1, LANES)]
                )
        output[row, head, T.Ramp(block * LANES, 1, LANES)] = _hsum8_each(
            [sums[j, T.Ramp(0, 1, LANES)] for j in range(LANES)]
        )
    lse[row, head] = peak[0] * T.float32(LOG2E) + T.log2(T.Cast("float32", weight[0]))


@T.macro(hygienic=False)
def _ggml_scores(q, row, head, count: int, keys, octets, tail, length, sm_scale, dim, probs, slot, width):
    """K.q of one token (_attend_ggml_heads) for the `count` query heads `head ..` of one KV head, each key's
    vectors read once for all of them: keys 8 octets[0] .. 8 octets[1] an octet at a time (K rows asked for
    ROWS_AHEAD keys ahead), then keys tail .. length one at a time; the scaled scores into probs[slot + h]."""
    ways = T.meta_var(32 // width)  # a key's K.q accumulators per head: ggml's 4, 32 // width a vector
    q16 = T.decl_buffer((count, dim), "float32")
    dots = T.decl_buffer((4, LANES), "float32")  # K.q partial sums of the tail keys
    octet_dots = T.decl_buffer((count * ways, width), "float32")
    halves = T.decl_buffer((count * LANES, LANES), "float32")  # 8 keys' K.q accumulators per head
    score = T.alloc_buffer((1,), "float32")
    where = T.alloc_buffer((LANES,), "int32")
    for h, d in T.grid(count, dim):
        q16[h, d] = T.Cast("float32", T.Cast("float16", T.Cast("float32", q[row, head + h, d])))
    for octet in range(octets[0], octets[1]):
        for j in range(LANES):  # a loop: 8 keys' accumulators for every head unrolled side by side would spill
            where[j] = keys.locate(octet * LANES + j)
            keys.ask_key(keys.locate(T.min(octet * LANES + j + ROWS_AHEAD, length - 1)), dim)
            for h in T.unroll(count):
                for a in T.unroll(ways):
                    octet_dots[h * ways + a, T.Ramp(0, 1, width)] = T.Broadcast(T.float32(0), width)
            for step in range(dim // 32):
                for a in T.unroll(ways):
                    key = T.meta_var(_key_part(keys, where[j], step * 32 + a * width, width))
                    for h in T.unroll(count):
                        octet_dots[h * ways + a, T.Ramp(0, 1, width)] = fma(
                            key,
                            q16[h, T.Ramp(step * 32 + a * width, 1, width)],
                            octet_dots[h * ways + a, T.Ramp(0, 1, width)],
                        )
            for h in T.unroll(count):
                if width > LANES:  # [a0 | a1] + [a2 | a3], halves added: (a0 + a2) + (a1 + a3)
                    halves[h * LANES + j, T.Ramp(0, 1, LANES)] = _fold(
                        octet_dots[h * ways, T.Ramp(0, 1, width)] + octet_dots[h * ways + 1, T.Ramp(0, 1, width)]
                    )
                else:
                    halves[h * LANES + j, T.Ramp(0, 1, LANES)] = _f16_dot_halves(
                        [octet_dots[h * ways + a, T.Ramp(0, 1, LANES)] for a in range(4)]
                    )
        for h in range(count):
            probs[slot + h, T.Ramp(octet * LANES, 1, LANES)] = _f16_dot_reduce_each(
                [halves[h * LANES + j, T.Ramp(0, 1, LANES)] for j in range(LANES)]
            ) * T.Broadcast(sm_scale, LANES)
    for i in range(tail, length):
        for h in range(count):
            head_q16 = T.decl_buffer((dim,), "float32", data=q16.data, elem_offset=h * dim)
            _ggml_score(keys, keys.locate(i), head_q16, dots, score, dim, sm_scale, True)
            probs[slot + h, i] = score[0]


@T.macro(hygienic=False)
def _ggml_head_softmax(probs, slot, length, lse, row, head):
    """ggml's soft_max of the scores probs[slot, :length] of query head `head` of token `row` (_ggml_softmax,
    after their maximum: exact in any order), and the head's log-sum-exp."""
    peaks = T.decl_buffer((LANES,), "float32")
    peak = T.alloc_buffer((1,), "float32")
    weight = T.alloc_buffer((1,), "float64")
    peaks[T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(-3.0e38), LANES)
    for c in range(length // LANES):
        peaks[T.Ramp(0, 1, LANES)] = T.max(peaks[T.Ramp(0, 1, LANES)], probs[slot, T.Ramp(c * LANES, 1, LANES)])
    peak[0] = T.float32(-3.0e38)
    for i in range(length // LANES * LANES, length):
        peak[0] = T.max(peak[0], probs[slot, i])
    for j in range(LANES):
        peak[0] = T.max(peak[0], peaks[j])
    _ggml_softmax(probs, slot, length, peak, weight, 0)
    lse[row, head] = peak[0] * T.float32(LOG2E) + T.log2(T.Cast("float32", weight[0]))


@T.macro(hygienic=False)
def _ggml_weigh_values(keys, count: int, length, probs, slot, output, row, head, dim: int, pv_width: int):
    """P.V of one token (_attend_ggml_heads) for the `count` query heads `head ..` of one KV head, `_pv_span`
    elements at a time: in ggml_vec_dot_f16's order, element d of key i into slot i % 32 (keys s, s + 32, ... in
    turn), the slots' sums in L1 and the keys in order, so that the value rows stream from memory (the slots'
    sums in registers had P.V read rows 32 keys apart: cold lines, one at a time)."""
    span = T.meta_var(_pv_span(dim, pv_width, count))
    # each head's 32 slot sums of `span` elements, 33 rows apart: heads 4 KB apart had each load of a head's sum
    # wait on the store of the previous head's (4 KB aliasing)
    acc = T.decl_buffer((count * 33, span), "float32")
    for part in range(dim // span):
        for r, e in T.grid(count * 33, span):
            acc[r, e] = T.float32(0)
        for i in range(length):
            loc: T.let[T.int32] = keys.locate(i)
            keys.ask_values(keys.locate(T.min(i + ROWS_AHEAD, length - 1)), part * span, span)
            for h in T.unroll(count):
                w: T.let[T.float32] = probs[slot + h, i]
                for v in T.unroll(span // pv_width):
                    at = T.meta_var(T.Ramp(v * pv_width, 1, pv_width))
                    value = T.meta_var(keys.values(loc, part * span + v * pv_width, pv_width))
                    acc[h * 33 + i % 32, at] = fma(T.Broadcast(w, pv_width), value, acc[h * 33 + i % 32, at])
        for h in range(count):
            head_acc = T.decl_buffer((32, span), "float32", data=acc.data, elem_offset=h * 33 * span)
            for dv in range(span // LANES):
                output[row, head + h, T.Ramp(part * span + dv * LANES, 1, LANES)] = _f16_dot_reduce_slots(
                    head_acc, T.Ramp(dv * LANES, 1, LANES)
                )


@T.macro(hygienic=False)
def _attend_ggml_heads(
    q, row, head, count: int, keys, length, sm_scale, output, lse, dim, probs, slot, width, scored: bool = False
):
    """_attend_ggml of one token (ggml_vec_dot_f16's orders) for the `count` query heads `head ..` of one KV
    head, their scores in probs[slot ..] (`scored`: there already): each key and value vector read once for all
    of them, each head's chains and additions exactly as _attend_ggml's. One head at a time read a KV head's K
    and V once per query head (SmolLM2, 9 heads on 3, at a context of 3000: attention was ~80% of a decode step,
    mostly waiting on the cache's rows)."""
    pv_width = T.meta_var(width if dim % width == 0 else LANES)
    if not scored:
        octets = T.meta_var(_octets(length, dim))
        _ggml_scores(q, row, head, count, keys, (0, octets), octets * LANES, length, sm_scale, dim, probs, slot, width)
    for h in range(count):
        _ggml_head_softmax(probs, slot + h, length, lse, row, head + h)
    _ggml_weigh_values(keys, count, length, probs, slot, output, row, head, dim, pv_width)


def _octets(length, dim: int):
    """Keys of one-token K.q scored 8 at a time (_ggml_scores): all whole octets where the head size is whole 32s
    (no float64 tail), else none."""
    return length // LANES if dim % 32 == 0 else 0


def _pv_span(dim: int, width: int, heads: int) -> int:
    """Elements of each head's output that one-token P.V of `heads` heads sums at a time: the most (whole
    vectors of `width`, dividing `dim`) whose 32 slot sums per head fit SLOT_SUM_BYTES."""
    fits = [n for n in range(width, dim + 1, width) if dim % n == 0 and heads * 32 * n * 4 <= SLOT_SUM_BYTES]
    return max(fits, default=width)


def _key(keys, loc, d) -> tirx.PrimExpr:
    return tirx.BufferLoad(keys.k_rows, [*keys.key_index(loc), tirx.Ramp(d, 1, LANES)]).astype(f"float32x{LANES}")


def _key_at(keys, loc, d) -> tirx.PrimExpr:
    return tirx.BufferLoad(keys.k_rows, [*keys.key_index(loc), d]).astype("float32")


def _f16_dot_reduce_slots(acc: tirx.Buffer, part: tirx.PrimExpr) -> tirx.PrimExpr:
    """_f16_dot_reduce for every element of `part` at once: slot 8 j + l is accumulator j's lane l."""
    x = [(acc[i, part] + acc[16 + i, part]) + (acc[8 + i, part] + acc[24 + i, part]) for i in range(LANES)]
    t = [x[k] + x[k + 4] for k in range(4)]
    return (t[0] + t[1]) + (t[2] + t[3])


def _hsum8_each(rows: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """[hsum8(rows[0]), ..., hsum8(rows[7])]: the 8 x 8 block transposed, then its rows added lane by lane."""
    columns = [tirx.Shuffle(rows, [tirx.IntImm("int32", LANES * j + i) for j in range(LANES)]) for i in range(LANES)]
    return lane_sum(columns)


def _f16_dot_halves(parts: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """The first step of ggml_vec_dot_f16's reduction: its 4 accumulators as (a0 + a2) + (a1 + a3)."""
    return (parts[0] + parts[2]) + (parts[1] + parts[3])


def _f16_dot_reduce_each(rows: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """The rest of _f16_dot_reduce for 8 vectors at once (the 8 x 8 block transposed): lane k of the result is
    (t0 + t1) + (t2 + t3) of rows[k], t_i its lanes i and i + 4 added."""
    columns = [tirx.Shuffle(rows, [tirx.IntImm("int32", LANES * j + i) for j in range(LANES)]) for i in range(LANES)]
    t = [columns[i] + columns[i + 4] for i in range(4)]
    return (t[0] + t[1]) + (t[2] + t[3])


def _f16_dot_reduce(parts: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """ggml_vec_dot_f16's reduction of its 4 accumulators: (a0 + a2) + (a1 + a3), halves added, hadd twice."""
    x = _f16_dot_halves(parts)
    lanes = [tirx.Shuffle([x], [tirx.IntImm("int32", k)]) for k in range(LANES)]
    t = [lanes[k] + lanes[k + 4] for k in range(4)]
    return (t[0] + t[1]) + (t[2] + t[3])


def _lane_reduce(v: tirx.PrimExpr, combine) -> tirx.PrimExpr:
    """combine(...) of the LANES lanes of v, halving the vector three times."""
    width = LANES
    while width > 1:
        width //= 2
        v = combine(
            tirx.Shuffle([v], [tirx.IntImm("int32", i) for i in range(width)]),
            tirx.Shuffle([v], [tirx.IntImm("int32", i + width) for i in range(width)]),
        )
    return v


def _add(a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    return a + b


# 2^x = 2^n * 2^f with n = round(x), f in [-0.5, 0.5]: 2^f = 1 + f * P(f) (Cephes' exp2f, ~2 ulp).
EXP2_POLY = (
    1.535336188319500e-4,
    1.339887440266574e-3,
    9.618437357674640e-3,
    5.550332471162809e-2,
    2.402264791363012e-1,
    6.931472028550421e-1,
)


def _exp2(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """2^x for a vector of x <= 0, in vector instructions (libm's exp2f is one call per lane); 0 below -126."""
    lanes = x.ty.dtype.lanes

    def splat(value, dtype="float32"):
        return tirx.Broadcast(tirx.const(value, dtype), lanes)

    clamped = tirx.max(x, splat(-126.0))
    n = tirx.floor(clamped + splat(0.5))
    f = clamped - n
    poly = splat(EXP2_POLY[0])
    for c in EXP2_POLY[1:]:
        poly = poly * f + splat(c)
    power = tirx.reinterpret(
        f"float32x{lanes}", (n.astype(f"int32x{lanes}") + splat(127, "int32")) << splat(23, "int32")
    )
    return tirx.Select(x > splat(-126.0), (splat(1.0) + f * poly) * power, splat(0.0))


def _balanced(order: tirx.PrimExpr, count: tirx.PrimExpr) -> tirx.PrimExpr:
    """Tasks 0, n-1, 1, n-2, ... in that order. Causal rows grow in cost with their position and the
    parallel loop hands each thread a contiguous range: interleaving short and long rows evens it out."""
    return tirx.if_then_else(order % 2 == 0, order // 2, count - 1 - order // 2)


def _chains(dim: int, width: int) -> int:
    """Vectors of `width` elements accumulated one after the other per key, and side by side per output: 4
    when the head dimension allows."""
    return next(n for n in (4, 2, 1) if (dim // width) % n == 0)


def attention_width(dim: int, wide: bool) -> int:
    """Elements per vector of mlcc's-order attention: 16 (512 bits) with `wide` (AVX-512) where they divide
    the head dimension, else LANES."""
    return 2 * LANES if wide and dim % (2 * LANES) == 0 else LANES


def _key_part(keys, loc, d, width: int) -> tirx.PrimExpr:
    """`width` elements of the key at `loc` from element d, as float32."""
    row = tirx.BufferLoad(keys.k_rows, [*keys.key_index(loc), tirx.Ramp(d, 1, width)])
    return row.astype(f"float32x{width}")


def _fold(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """A vector's lanes added down to LANES (its halves added; LANES lanes as they are)."""
    lanes = v.ty.dtype.lanes
    return v if lanes == LANES else lanes_of(v, 0, LANES) + lanes_of(v, LANES, LANES)


@T.macro
def _start(q, q_scaled, out, row, head, first, heads, sm_scale, d_qk, d_v):
    """Query heads `head ..` of a row, scaled for base-2 scores, into scratch rows `first ..`; outputs zeroed."""
    for g in range(heads):
        for d in T.vectorized(d_qk):
            q_scaled[first + g, d] = T.Cast("float32", q[row, head + g, d]) * (sm_scale * LOG2E)
        for d in T.vectorized(d_v):
            out[first + g, d] = T.float32(0)


@T.macro
def _finish(output, lse, row, head, first, heads, out, state, dim):
    """The normalized output rows and their log2-sum-exp, for merging with other partial attentions."""
    for g in range(heads):
        for d in T.vectorized(dim):
            output[row, head + g, d] = T.Cast(output.dtype, out[first + g, d] / state[first + g, 1])
        lse[row, head + g] = state[first + g, 0] + T.log2(state[first + g, 1])


@T.macro
def _rows_to_sequences(q_indptr, batch_size, sequence_of):
    """sequence_of[row]: the sequence a row of a ragged batch belongs to."""
    for b in range(batch_size):
        for i in range(q_indptr[b + 1] - q_indptr[b]):
            sequence_of[q_indptr[b] + i] = b


class PagedKeys:
    """Keys and values of one sequence and KV head in the paged cache (sliding window aware). `rows`: the
    pages [pages, 2, h_kv, page_size, dim] viewed as rows of dim (`page_rows`); a key's location is its K row,
    its V row h_kv * page_size further (no division per access)."""

    def __init__(self, rows, page_table, length_info, seq, first_page, kv_head, q_scaled, sliding_window, skip=0):
        self.page_table, self.length_info, self.seq = page_table, length_info, seq
        self.first_page, self.kv_head, self.q_scaled = first_page, kv_head, q_scaled
        self.sliding_window, self.skip = sliding_window, skip  # skip: cached tokens before key 0
        self.k_rows, self.heads, self.page_size = rows.buffer, rows.heads, rows.page_size

    def locate(self, i):
        pos = _get_seq_offset(self.skip + i, self.seq, self.length_info, self.sliding_window)
        page = self.page_table[self.first_page + pos // self.page_size]
        return (page * 2 * self.heads + self.kv_head) * self.page_size + pos % self.page_size

    def key_index(self, loc):
        return (loc,)

    def values(self, loc, d, width: int = LANES):
        row = tirx.BufferLoad(self.k_rows, [loc + self.heads * self.page_size, tirx.Ramp(d, 1, width)])
        return row.astype(f"float32x{width}")

    def ask_key(self, loc, dim: int):
        """Ask for the cache lines of the key row at `loc`, into L2."""
        for d in range(0, dim, 512 // DataType(self.k_rows.dtype).bits):  # elements per 64-byte line
            T.evaluate(prefetch(self.k_rows, loc, d, into_l1=False))

    def ask_values(self, loc, first, count: int):
        """Ask for the cache lines of elements first .. first + count of the value row at `loc`, into L2."""
        for d in range(0, count, 512 // DataType(self.k_rows.dtype).bits):
            T.evaluate(prefetch(self.k_rows, loc + self.heads * self.page_size, first + d, into_l1=False))


class StagedKeys:
    """PagedKeys of a cache narrower than float32 (float16), each tile's K and V rows widened into a task's
    float32 rows `k_rows[task]`, `v_rows[task]` once (_attend), not at each query's read: a paged prefill task
    reads each key for up to TOKENS_PER_TASK tokens' query heads. A key's location is its row in the tile."""

    def __init__(self, cache: PagedKeys, k_rows, v_rows, task):
        self.cache, self.k_rows, self.v_rows, self.task = cache, k_rows, v_rows, task
        self.q_scaled = cache.q_scaled

    def locate(self, i):
        return self.cache.locate(i)

    def key_index(self, r):
        return (self.task, r)

    def values(self, r, d, width: int = LANES):
        return tirx.BufferLoad(self.v_rows, [self.task, r, tirx.Ramp(d, 1, width)])

    def ask_key(self, loc, dim: int):
        self.cache.ask_key(loc, dim)

    def ask_values(self, loc, first, count: int):
        self.cache.ask_values(loc, first, count)


@dataclass(frozen=True)
class PageRows:
    """A paged cache's pages as rows (`page_rows`), with the layout PagedKeys needs to find a key's row."""

    buffer: tirx.Buffer
    heads: int
    page_size: int


def page_rows(pages: tirx.Buffer) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """The shape of pages [pages, 2, h_kv, page_size, dim] as rows of dim."""
    count, _, heads, size, dim = pages.shape
    return (count * 2 * heads * size, dim)


@dataclass(frozen=True)
class PageTable:
    """A paged cache's rows with the page table and lengths that place each sequence's keys in them."""

    rows: PageRows
    indptr: tirx.Buffer  # sequence b's pages: values[indptr[b] : indptr[b + 1]]
    values: tirx.Buffer
    length_info: tirx.Buffer
    sliding_window: bool

    def length(self, b, begin, end) -> tirx.PrimExpr:
        """Sequence b's keys, its pages values[begin:end] (not none)."""
        return _get_kv_chunk_len(end - begin, self.rows.page_size, b, self.length_info, self.sliding_window)

    def keys(self, b, begin, kv_head, q_scaled) -> PagedKeys:
        return PagedKeys(self.rows, self.values, self.length_info, b, begin, kv_head, q_scaled, self.sliding_window)


class RaggedKeys:
    """Keys and values of one sequence and KV head given as ragged [tokens, heads, dim] arrays; a key's
    location is its token index."""

    def __init__(self, k, v, first, kv_head, q_scaled, v_by_dim=None):
        self.k_rows, self.v, self.first, self.kv_head, self.q_scaled = k, v, first, kv_head, q_scaled
        self.v_by_dim = v_by_dim  # [kv_head, dim, token]: V transposed (llama.cpp numerics)

    def locate(self, i):
        return self.first + i

    def key_index(self, loc):
        return (loc, self.kv_head)

    def values(self, loc, d, width: int = LANES):
        return tirx.BufferLoad(self.v, [loc, self.kv_head, tirx.Ramp(d, 1, width)]).astype(f"float32x{width}")

    def ask_key(self, loc, dim: int):
        """Nothing: a sequence's new tokens lie in one piece, which the hardware prefetcher follows."""

    def ask_values(self, loc, first, count: int):
        """Nothing (see ask_key)."""

    def values_by_dim(self, d, i):
        """Element d of the values of keys i .. i + LANES."""
        at = tirx.Cast("int64", self.first + i)
        return tirx.BufferLoad(self.v_by_dim, [self.kv_head, d, tirx.Ramp(at, tirx.const(1, "int64"), LANES)])


@T.macro(hygienic=False)
def _ggml_decode_task(
    task, count: int, group: int, dim: int, width: int, table, q, output, lse, probs, sm_scale, scored: bool = False
):
    """Decode task `task` in llama.cpp's arithmetic: `count` query heads of one KV head of one sequence
    (`scored`: their scores already in probs, see _ggml_split_decode)."""
    heads = T.meta_var(q.shape[1])
    b: T.let[T.int32] = task // (heads // count)
    h: T.let[T.int32] = task % (heads // count) * count  # the task's first query head
    begin: T.let[T.int32] = table.indptr[b]
    end: T.let[T.int32] = table.indptr[b + 1]
    if begin != end:
        length: T.let[T.int32] = table.length(b, begin, end)
        keys = T.meta_var(table.keys(b, begin, h // group, None))
        slot = T.meta_var(b * heads + h)
        _attend_ggml_heads(q, b, h, count, keys, length, sm_scale, output, lse, dim, probs, slot, width, scored)
    else:  # no keys at this depth of the block tree: a part that merges in with weight 0
        for g, d in T.grid(count, dim):
            output[b, h + g, d] = T.Cast(output.dtype, T.float32(0))
        for g in range(count):
            lse[b, h + g] = T.float32(EMPTY_LSE)


@T.macro(hygienic=False)
def _decode_task(
    task,
    count: int,
    group: int,
    dim: int,
    width: int,
    softcap: float,
    table,
    q,
    output,
    lse,
    scratch,
    sm_scale,
    scored=None,
):
    """Decode task `task` in mlcc's order: `count` query heads of one KV head of one sequence (`scored`: their
    scores already in those rows, see _split_decode)."""
    q_scaled, out, scores, state, where = scratch
    heads = T.meta_var(q.shape[1])
    b: T.let[T.int32] = task // (heads // count)
    h: T.let[T.int32] = task % (heads // count) * count  # the task's first query head
    slot = T.meta_var(b * heads + h)
    begin: T.let[T.int32] = table.indptr[b]
    end: T.let[T.int32] = table.indptr[b + 1]
    length: T.let[T.int32] = T.if_then_else(begin != end, table.length(b, begin, end), 0)
    if scored is None:  # (a split decode started its queries before scoring them)
        _start(q, q_scaled, out, b, h, slot, count, sm_scale, dim, dim)
    keys = T.meta_var(table.keys(b, begin, h // group, q_scaled))
    _attend(slot, count, length, keys, scores, state, out, where, dim, softcap, None, width, scored)
    _finish(output, lse, b, h, slot, count, out, state, dim)


@dataclass(frozen=True)
class KeyPiece:
    """One task of a split decode's K.q (_score_in_pieces): sequence b (its pages from `begin`, `length` keys in
    `octets` octets), query heads from h, piece `piece`, its octets first .. last."""

    b: tirx.PrimExpr
    h: tirx.PrimExpr
    piece: tirx.PrimExpr
    begin: tirx.PrimExpr
    length: tirx.PrimExpr
    octets: tirx.PrimExpr
    first: tirx.PrimExpr
    last: tirx.PrimExpr


def _tile_octets(length):
    """Octets of keys in the whole tiles over `length` keys: all that _attend scores."""
    return (length + TILE - 1) // TILE * (TILE // LANES)


@T.macro(hygienic=False)
def _score_in_pieces(units, heads, count: int, pieces, table, octets_of, score):
    """The K.q of a split decode: each of `units` (sequence b, `count` query heads from h) in `pieces` tasks, in
    parallel, each task `score(KeyPiece)` for its share of the `octets_of(length)` octets of keys of a sequence
    with keys."""
    for task in T.parallel(units * pieces):
        b: T.let[T.int32] = task // pieces // (heads // count)
        h: T.let[T.int32] = task // pieces % (heads // count) * count
        piece: T.let[T.int32] = task % pieces
        begin: T.let[T.int32] = table.indptr[b]
        end: T.let[T.int32] = table.indptr[b + 1]
        if begin != end:
            length: T.let[T.int32] = table.length(b, begin, end)
            octets: T.let[T.int32] = octets_of(length)
            share: T.let[T.int32] = (octets + pieces - 1) // pieces
            first: T.let[T.int32] = T.min(piece * share, octets)
            score(KeyPiece(b, h, piece, begin, length, octets, first, T.min(first + share, octets)))


@T.macro(hygienic=False)
def _score_piece(count: int, group: int, heads: int, dim, width, softcap, table, q_scaled, scored, at):
    """_score_in_pieces's task in mlcc's order: its octets of keys scored as _attend scores them, into the rows of
    `scored` (those of q_scaled) of its `count` query heads (`heads` a sequence)."""
    keys = T.meta_var(table.keys(at.b, at.begin, at.h // group, q_scaled))
    spots = T.alloc_buffer((1, LANES), "int32")
    for o in range(at.first, at.last):
        for j in range(LANES):
            spots[0, j] = keys.locate(T.min(o * LANES + j, at.length - 1))
            keys.ask_key(keys.locate(T.min(o * LANES + j + ROWS_AHEAD, at.length - 1)), dim)
        for g in range(count):
            _score_octet(keys, spots, (0, 0), at.b * heads + at.h + g, dim, width, softcap, scored, o * LANES)


@T.macro(hygienic=False)
def _split_decode(
    count: int, group: int, dim, width, softcap, table, q, output, lse, scratch, scored, sm_scale, pieces
):
    """Decode in mlcc's order for when a task per `count` query heads would leave threads idle at a long
    context: the queries scaled, then K.q with each task's keys in `pieces` pieces (8 keys at a time, as
    _attend scores them) into `scored`, then the softmax and P.V a task per `count` heads. The same bits."""
    q_scaled, out = scratch[0], scratch[1]
    heads = T.meta_var(q.shape[1])
    units = T.meta_var(q.shape[0] * heads // count)  # sequences x groups of `count` query heads
    for unit in T.parallel(units):
        _start(
            q,
            q_scaled,
            out,
            unit // (heads // count),
            unit % (heads // count) * count,
            unit * count,
            count,
            sm_scale,
            dim,
            dim,
        )
    score = T.meta_var(
        functools.partial(_score_piece, count, group, heads, dim, width, softcap, table, q_scaled, scored)
    )
    _score_in_pieces(units, heads, count, pieces, table, _tile_octets, score)
    for task in T.parallel(units):
        _decode_task(task, count, group, dim, width, softcap, table, q, output, lse, scratch, sm_scale, scored)


@T.macro(hygienic=False)
def _ggml_score_piece(count: int, group: int, pieces, dim, width, table, q, probs, sm_scale, at):
    """_score_in_pieces's task in llama.cpp's order: octets first .. last of keys (_ggml_scores), and in the
    last piece the keys past the whole octets one at a time."""
    tail: T.let[T.int32] = T.if_then_else(at.piece == pieces - 1, at.octets * LANES, at.length)
    keys = T.meta_var(table.keys(at.b, at.begin, at.h // group, None))
    slot = T.meta_var(at.b * q.shape[1] + at.h)
    _ggml_scores(q, at.b, at.h, count, keys, (at.first, at.last), tail, at.length, sm_scale, dim, probs, slot, width)


@T.macro(hygienic=False)
def _ggml_split_decode(count: int, group: int, dim: int, width: int, table, q, output, lse, probs, sm_scale, pieces):
    """Decode in llama.cpp's arithmetic (_attend_ggml_heads) for when a task per `count` query heads would leave
    threads idle: K.q with each task's keys in `pieces` pieces, then the softmax and P.V a task per `count`
    heads (P.V split by elements read a fraction of each value row per task: SmolLM2's heads at 2000 keys, 2
    threads, 30 layers: ~3.6 ms whole, ~4.8 in quarters). Every key's score takes the operations of one task:
    the same bits."""
    heads = T.meta_var(q.shape[1])
    units = T.meta_var(q.shape[0] * heads // count)  # sequences x groups of `count` query heads
    score = T.meta_var(
        functools.partial(_ggml_score_piece, count, group, pieces, dim, width, table, q, probs, sm_scale)
    )
    _score_in_pieces(units, heads, count, pieces, table, functools.partial(_octets, dim=dim), score)
    for task in T.parallel(units):
        _ggml_decode_task(task, count, group, dim, width, table, q, output, lse, probs, sm_scale, scored=True)


@T.macro(hygienic=False)
def _decode_tasks(count: int, llamacpp: bool, group, dim, width, softcap, table, q, output, lse, scratch, sm_scale):
    """Every decode task of `count` query heads, in parallel; `scratch`: llama.cpp's order, the scores' rows;
    mlcc's, _decode_task's rows."""
    tasks = T.meta_var(q.shape[0] * q.shape[1] // count)
    if llamacpp:
        for task in T.parallel(tasks):
            _ggml_decode_task(task, count, group, dim, width, table, q, output, lse, scratch, sm_scale)
    else:
        for task in T.parallel(tasks):
            _decode_task(task, count, group, dim, width, softcap, table, q, output, lse, scratch, sm_scale)


def decode_task_heads(h_kv: int, group: int, wide: bool) -> int:
    """Query heads of one KV head that a decode task takes together, each K and V row read once for all: the
    whole group, up to 8 (4 with 16 vector registers), and half of it where one KV head would leave a batch of
    one a single task."""
    limit = min(8 if wide else 4, group if h_kv > 1 else max(1, group // 2))
    return max(n for n in range(1, limit + 1) if group % n == 0)


def decode_attention(
    h_kv: int,
    h_qo: int,
    dim: int,
    page_size: int,
    dtype: str,
    sliding_window: bool,
    numerics: Numerics = Numerics.MLCC,
    softcap: float = 0.0,
    wide: bool = False,
):
    """Drop-in for TVM's `batch_decode_paged_kv_cpu`: one query per sequence against its paged K/V, a task per
    `decode_task_heads` query heads; LLAMACPP numerics: llama.cpp's arithmetic (_attend_ggml_heads, or
    _ggml_split_decode where the tasks would leave threads idle at a long context). `wide`: see
    `attention_width`."""
    llamacpp = numerics == Numerics.LLAMACPP
    width = attention_width(dim, wide)
    group = h_qo // h_kv
    heads = decode_task_heads(h_kv, group, wide)  # query heads a task takes, sharing each K and V read
    symbol = DECODE_SYMBOL + ("_sliding_window" if sliding_window else "")

    @T.prim_func(s_tir=True)
    def kernel(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle,
        var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": symbol})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        indptr_offset = T.int32()
        values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_offset = T.int32()
        Q = T.match_buffer(Q_handle, (B, h_qo, dim), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, dim), dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=indptr_offset)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=values_offset)
        T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(output_handle, (B, h_qo, dim), dtype)
        lse = T.match_buffer(lse_handle, (B, h_qo), "float32")
        length_info = _declare_length_info(var_length_info, B, sliding_window, length_offset)
        rows = T.decl_buffer(page_rows(pages), dtype, data=pages.data)
        cache = T.meta_var(PageRows(rows, h_kv, page_size))
        # Per (sequence, head) state, allocated once outside the parallel loop (a buffer allocated inside it
        # costs a workspace call per iteration).
        q_scaled = T.alloc_buffer((B * h_qo, dim), "float32")
        out = T.alloc_buffer((B * h_qo, dim), "float32")
        scores = T.alloc_buffer((B * h_qo, TILE), "float32")
        state = T.alloc_buffer((B * h_qo, 4), "float32")
        where = T.alloc_buffer((B * h_qo, TILE), "int32")
        # each task's scores: room for the whole cache (a buffer sized by a loop variable can't be)
        scores_of = T.alloc_buffer((B * h_qo, max_num_pages * page_size + TILE), "float32")
        if llamacpp:
            scratch = T.meta_var(scores_of)
        else:
            scratch = T.meta_var((q_scaled, out, scores, state, where))  # the tasks' rows
        table = T.meta_var(PageTable(cache, page_table_indptr, page_table_values, length_info, sliding_window))
        longest = T.alloc_buffer((1,), "int32")  # the batch's longest context
        longest[0] = 0
        for b in range(B):
            if page_table_indptr[b + 1] != page_table_indptr[b]:
                longest[0] = T.max(longest[0], table.length(b, page_table_indptr[b], page_table_indptr[b + 1]))
        shared: T.let[T.bool] = tirx.Or(B * h_kv >= SHARED_TASKS, longest[0] >= SHARED_LENGTH)
        # a long context whose tasks leave a quarter of the threads' time idle: split (the same bits)
        threads: T.let[T.int32] = T.if_then_else(longest[0] >= SPLIT_LENGTH, T.call_packed("runtime.NumThreads"), 1)
        units = T.meta_var(B * h_qo // heads)
        split: T.let[T.bool] = 4 * units <= 3 * threads * ((units + threads - 1) // threads)
        # a parallel loop for each task size, each with its own kernel (a task size known only at run time
        # compiled mlcc's order ~20x slower, one loop holding both of llama.cpp's order ~4x)
        if split:
            if llamacpp:
                _ggml_split_decode(heads, group, dim, width, table, Q, output, lse, scratch, sm_scale, threads)
            else:
                _split_decode(
                    heads, group, dim, width, softcap, table, Q, output, lse, scratch, scores_of, sm_scale, threads
                )
        elif shared if heads > 1 else False:  # (one task size where a task takes one head anyway)
            _decode_tasks(heads, llamacpp, group, dim, width, softcap, table, Q, output, lse, scratch, sm_scale)
        else:
            _decode_tasks(1, llamacpp, group, dim, width, softcap, table, Q, output, lse, scratch, sm_scale)

    return kernel


def prefill_ragged_attention(
    h_kv: int,
    h_q: int,
    d_qk: int,
    d_v: int,
    dtype: str,
    numerics: Numerics = Numerics.MLCC,
    softcap: float = 0.0,
    head_pairs: bool = False,
    wide: bool = False,
):
    """Drop-in for TVM's CPU `batch_prefill_ragged_kv`: the new tokens of each sequence attend to each
    other (causally when `causal`), K and V given as ragged arrays, not pages; LLAMACPP numerics: llama.cpp's
    arithmetic (_attend_ggml, with the batch of one sequence's new tokens as llama.cpp's batch; one token:
    _attend_ggml_heads). `head_pairs` (32 vector registers: _attend_ggml_pair's 16 accumulators): query heads
    sharing a KV head two at a time; `wide`: see `attention_width`."""
    llamacpp = numerics == Numerics.LLAMACPP
    width = min(attention_width(d_qk, wide), attention_width(d_v, wide))
    group = h_q // h_kv
    pairs = head_pairs and group % 2 == 0
    per_task = 2 if pairs else 1  # query heads of one task

    @T.prim_func(s_tir=True)
    def kernel(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        var_kv_indptr: T.handle,
        var_q_rope_position: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_offset = T.int32()
        kv_indptr_offset = T.int32()
        q_rope_offset = T.int32()
        k_rope_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d_qk), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d_qk), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d_v), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_offset)
        T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        output = T.match_buffer(var_output, (qo_len, h_q, d_v), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")
        sequence_of = T.alloc_buffer((qo_len,), "int32")
        q_scaled = T.alloc_buffer((qo_len * h_q, d_qk), "float32")
        out = T.alloc_buffer((qo_len * h_q, d_v), "float32")
        scores = T.alloc_buffer((qo_len * h_q, TILE), "float32")
        state = T.alloc_buffer((qo_len * h_q, 4), "float32")
        where = T.alloc_buffer((qo_len * h_q, TILE), "int32")
        _rows_to_sequences(q_indptr, batch_size, sequence_of)
        if dtype != "float32":  # a narrower cache's K and V widened once, not at each of every row's reads
            k_wide = T.alloc_buffer((kv_len, h_kv, d_qk), "float32")
            v_wide = T.alloc_buffer((kv_len, h_kv, d_v), "float32")
            for i in T.parallel(kv_len):
                for h, d in T.grid(h_kv, d_qk):
                    k_wide[i, h, d] = T.Cast("float32", k[i, h, d])
                for h, d in T.grid(h_kv, d_v):
                    v_wide[i, h, d] = T.Cast("float32", v[i, h, d])
            k_read, v_read = T.meta_var(k_wide), T.meta_var(v_wide)
        else:
            k_read, v_read = T.meta_var(k), T.meta_var(v)
        if llamacpp:
            scores_of = T.alloc_buffer((qo_len * h_q, kv_len + LANES), "float32")  # each task's scores
            # V transposed for P.V's chains over keys; its last 8 columns zero (weight 0 past a sequence's end)
            v_by_dim = T.alloc_buffer((h_kv, d_v, T.Cast("int64", kv_len) + LANES), "float32")
            for hd in T.parallel(h_kv * d_v):
                for i in range(kv_len):
                    v_by_dim[hd // d_v, hd % d_v, i] = T.Cast("float32", v[i, hd // d_v, hd % d_v])
                for i in range(LANES):
                    v_by_dim[hd // d_v, hd % d_v, kv_len + i] = T.float32(0)
            for order in T.parallel(qo_len * h_q // per_task):
                task: T.let[T.int32] = _balanced(order, qo_len * h_q // per_task)
                row: T.let[T.int32] = task // (h_q // per_task)
                head: T.let[T.int32] = task % (h_q // per_task) * per_task
                b: T.let[T.int32] = sequence_of[row]
                q_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                k_len: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                length: T.let[T.int32] = T.if_then_else(causal > 0, k_len - q_len + (row - q_indptr[b]) + 1, k_len)
                start: T.let[T.int32] = kv_indptr[b]
                keys = T.meta_var(RaggedKeys(k_read, v_read, start, head // group, None, v_by_dim))
                slot = T.meta_var(row * h_q + head)  # the scores' row of each query head: its own
                if q_len == 1:
                    _attend_ggml_heads(
                        q, row, head, per_task, keys, length, sm_scale, output, lse, d_v, scores_of, slot, width
                    )
                elif pairs:  # (a head size of whole vectors: tinyBLAS's order throughout)
                    _attend_ggml_pair(q, row, head, keys, length, sm_scale, output, lse, d_v, scores_of, slot)
                else:
                    for h in range(per_task):
                        _attend_ggml(q, row, head + h, keys, length, sm_scale, output, lse, d_v, scores_of, slot + h)
        else:
            for order in T.parallel(qo_len * h_kv):  # a token's query heads sharing a KV head
                task: T.let[T.int32] = _balanced(order, qo_len * h_kv)
                row: T.let[T.int32] = task // h_kv
                kv_head: T.let[T.int32] = task % h_kv
                first: T.let[T.int32] = row * h_q + kv_head * group
                b: T.let[T.int32] = sequence_of[row]
                q_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                k_len: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                # Causal: query i of the chunk sees the cached prefix and the chunk's first i + 1 tokens.
                length: T.let[T.int32] = T.if_then_else(causal > 0, k_len - q_len + (row - q_indptr[b]) + 1, k_len)
                _start(q, q_scaled, out, row, kv_head * group, first, group, sm_scale, d_qk, d_v)

                keys = T.meta_var(RaggedKeys(k_read, v_read, kv_indptr[b], kv_head, q_scaled))
                _attend(first, group, length, keys, scores, state, out, where, d_v, softcap, None, width)
                _finish(output, lse, row, kv_head * group, first, group, out, state, d_v)

    return kernel


TOKENS_PER_TASK = 8  # new tokens of a paged prefill task that share each tile of cached keys


def _first_cached(i, kv_len, causal, window: int):
    """The first cached key token i of a chunk sees (TVM's masks): a sliding window sees its last
    `window - i - 1` cached tokens; otherwise all from the first."""
    if window == 0:
        return tirx.const(0, "int32")
    return tirx.if_then_else(causal > 0, tirx.max(kv_len - tirx.max(window - i - 1, 0), 0), 0)


def _last_cached(i, kv_len, q_len, causal, window: int):
    """One past the last cached key token i of a chunk sees: causal, the cache up to its own position."""
    if window > 0:
        return kv_len
    return tirx.if_then_else(causal > 0, tirx.min(kv_len, kv_len - q_len + i + 1), kv_len)


def _cached_length(page_indptr, b, page_size: int, length_info, sliding_window: bool):
    """Cached tokens of sequence b in the pages (0 for none)."""
    begin, end = page_indptr[b], page_indptr[b + 1]
    return tirx.if_then_else(begin != end, _get_kv_chunk_len(end - begin, page_size, b, length_info, sliding_window), 0)


def _keys_seen(i0, group: int, kv_len, q_len, causal, window: int, skip):
    """g -> (lo, hi): the cached keys query row g of a run sees (its token i0 + g // group), counted from `skip`."""

    def seen(g):
        i = i0 + g // group
        lo = _first_cached(i, kv_len, causal, window) - skip
        return lo, tirx.max(_last_cached(i, kv_len, q_len, causal, window) - skip, lo)

    return seen


def prefill_paged_attention(
    h_kv: int,
    h_q: int,
    dim: int,
    page_size: int,
    dtype: str,
    sliding_window: bool,
    window_size: int,
    softcap: float = 0.0,
    wide: bool = False,
):
    """Drop-in for TVM's `batch_prefill_paged_kv_cpu`: each new token attends to its sequence's cached
    (paged) tokens, with TVM's masks (causal, or the sliding window's view of the past). `wide`: see
    `attention_width`."""
    group = h_q // h_kv
    width = attention_width(dim, wide)
    window = window_size if sliding_window else 0

    @T.prim_func(s_tir=True)
    def kernel(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_pages: T.handle,
        var_page_indptr: T.handle,
        var_page_values: T.handle,
        var_length_info: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_offset = T.int32()
        page_indptr_offset = T.int32()
        page_values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, dim), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, dim), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(var_output, (total_len, h_q, dim), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        length_info = _declare_length_info(var_length_info, batch_size, sliding_window, length_offset)
        rows = T.decl_buffer(page_rows(pages), dtype, data=pages.data)
        cache = T.meta_var(PageRows(rows, h_kv, page_size))
        sequence_of = T.alloc_buffer((total_len,), "int32")
        q_scaled = T.alloc_buffer((total_len * h_q, dim), "float32")
        out = T.alloc_buffer((total_len * h_q, dim), "float32")
        scores = T.alloc_buffer((total_len * h_q, TILE), "float32")
        state = T.alloc_buffer((total_len * h_q, 4), "float32")
        where = T.alloc_buffer((total_len * h_q, TILE), "int32")
        _rows_to_sequences(q_indptr, batch_size, sequence_of)
        blocks = T.meta_var((total_len + TOKENS_PER_TASK - 1) // TOKENS_PER_TASK)
        if dtype != "float32":  # each task's tile of keys and values, widened (StagedKeys)
            k_tiles = T.alloc_buffer((blocks * h_kv, TILE, dim), "float32")
            v_tiles = T.alloc_buffer((blocks * h_kv, TILE, dim), "float32")
        # Tasks of TOKENS_PER_TASK consecutive tokens and one KV head: each run of the task's tokens that are of
        # one sequence takes their query heads through each tile of cached keys together (each key read once for
        # all of them). Tiles start at multiples of TILE in the cache, whatever a query's first key (a sliding
        # window's moves with the token), so a query's arithmetic does not depend on the other tokens of its run.
        # Scratch row of (token, KV head, j): (kv_head * total_len + token) * group + j, so a run's are consecutive.
        for order in T.parallel(blocks * h_kv):
            task: T.let[T.int32] = _balanced(order, blocks * h_kv)
            r0: T.let[T.int32] = task // h_kv * TOKENS_PER_TASK
            kv_head: T.let[T.int32] = task % h_kv
            count: T.let[T.int32] = T.min(TOKENS_PER_TASK, total_len - r0)
            for u in range(count):
                row: T.let[T.int32] = r0 + u
                b: T.let[T.int32] = sequence_of[row]
                if u == 0 or sequence_of[T.max(row - 1, 0)] != b:  # a run starts
                    run: T.let[T.int32] = T.min(r0 + count, q_indptr[b + 1]) - row
                    i: T.let[T.int32] = row - q_indptr[b]
                    q_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    kv_len: T.let[T.int32] = _cached_length(page_indptr, b, page_size, length_info, sliding_window)
                    skip: T.let[T.int32] = _first_cached(i, kv_len, causal, window) // TILE * TILE  # first tile
                    begin: T.let[T.int32] = page_indptr[b]
                    slot: T.let[T.int32] = (kv_head * total_len + row) * group
                    for t in range(run):
                        _start(q, q_scaled, out, row + t, kv_head * group, slot + t * group, group, sm_scale, dim, dim)
                    paged = T.meta_var(
                        PagedKeys(cache, page_values, length_info, b, begin, kv_head, q_scaled, sliding_window, skip)
                    )
                    keys = T.meta_var(paged if dtype == "float32" else StagedKeys(paged, k_tiles, v_tiles, task))
                    seen = T.meta_var(_keys_seen(i, group, kv_len, q_len, causal, window, skip))
                    longest = T.meta_var(seen(run * group - 1)[1])
                    _attend(slot, run * group, longest, keys, scores, state, out, where, dim, softcap, seen, width)
                    for t in range(run):
                        _finish(output, lse, row + t, kv_head * group, slot + t * group, group, out, state, dim)

    return kernel


def _soft_cap(scores: tirx.PrimExpr, softcap: float) -> tirx.PrimExpr:
    """cap * tanh(s / cap) of base-2 scores s * LOG2E (q carries sm_scale * LOG2E), kept in base 2."""
    if not softcap:
        return scores
    inner = tirx.Broadcast(tirx.const(1 / (softcap * LOG2E), "float32"), LANES)
    outer = tirx.Broadcast(tirx.const(softcap * LOG2E, "float32"), LANES)
    return outer * tirx.tanh(scores * inner)
