"""Faster CPU attention kernels for TVM's paged KV cache: decode, prefill against the cache, and prefill of
the new tokens among themselves (ragged).

TVM 0.27's CPU kernels walk one (sequence, head) at a time on one thread, with scalar loops and a softmax
rescale of the whole output row after every key; at a context of a few hundred tokens decode attention costs
as much as all the model's matmuls. These keep TVM's signatures and arithmetic (online softmax in base 2)
but run (query, head) pairs in parallel, score 16 keys at a time with 8-wide vector dot products, and
rescale once per 16 keys.

mlcc's caches apply RoPE when K is appended (or the model applies it), never inside attention, so the kernel
reads K as stored and ignores `rotary_mode`.
"""

from __future__ import annotations

import math

import tvm
from tvm import tirx
from tvm.relax.frontend.nn.llm._kernel_common import _declare_length_info, _get_kv_chunk_len, _get_seq_offset
from tvm.script import tirx as T

from quant_schemes.vector_exprs import tree_sum

TILE = 16  # cached tokens scored per softmax update
LANES = 8
LOG2E = math.log2(math.e)
DECODE_SYMBOL = "batch_decode_paged_kv_cpu"
PAGED_PREFILL_SYMBOL = "batch_prefill_paged_kv_cpu"
RAGGED_PREFILL_SYMBOL = "batch_prefill_ragged_kv"  # the CPU pipeline only ever sees TVM's CPU variant


def _lane_sum(v: tirx.PrimExpr) -> tirx.PrimExpr:
    return tree_sum([tirx.Shuffle([v], [tirx.IntImm("int32", i)]) for i in range(LANES)])


@T.macro(hygienic=False)
def _attend(bh, length, keys, scores, state, out, dim):
    """Online softmax (base 2) of one query over `length` keys, 16 keys per rescale of the output row.

    keys.score(i): the scaled score of key i; keys.value(i, d): element d of value i. As TVM's kernels,
    the running sum starts with a phantom 1 at score -5e4 that vanishes once a real score arrives."""
    state[bh, 0] = T.float32(-5e4)  # running max
    state[bh, 1] = T.float32(1)  # running sum
    for tile in range((length + TILE - 1) // TILE):
        state[bh, 2] = state[bh, 0]  # the tile's new max
        for r in range(TILE):
            if tile * TILE + r < length:
                key_s = T.meta_var(keys.score(tile * TILE + r))
                scores[bh, r] = key_s
                state[bh, 2] = T.max(state[bh, 2], scores[bh, r])
        rescale: T.let[T.float32] = T.exp2(state[bh, 0] - state[bh, 2])
        state[bh, 1] = state[bh, 1] * rescale
        for d in T.vectorized(dim):
            out[bh, d] = out[bh, d] * rescale
        for r in range(TILE):
            if tile * TILE + r < length:
                p: T.let[T.float32] = T.exp2(scores[bh, r] - state[bh, 2])
                state[bh, 1] = state[bh, 1] + p
                for d in T.vectorized(dim):
                    value = T.meta_var(keys.value(tile * TILE + r, d))
                    out[bh, d] = out[bh, d] + p * T.Cast("float32", value)
        state[bh, 0] = state[bh, 2]


@T.macro
def _finish(output, lse, row, head, slot, out, state, dim):
    """The normalized output row and its log2-sum-exp, for merging with other partial attentions."""
    for d in T.vectorized(dim):
        output[row, head, d] = T.Cast(output.dtype, out[slot, d] / state[slot, 1])
    lse[row, head] = state[slot, 0] + T.log2(state[slot, 1])


@T.macro
def _rows_to_sequences(q_indptr, batch_size, sequence_of):
    """sequence_of[row]: the sequence a row of a ragged batch belongs to."""
    for b in range(batch_size):
        for i in range(q_indptr[b + 1] - q_indptr[b]):
            sequence_of[q_indptr[b] + i] = b


def _dot(q_scaled, bh, keys, key_index: tuple, dim: int) -> tirx.PrimExpr:
    """q . k as a tree of 8-wide products; `key_index` addresses the key row without its last axis."""
    terms = []
    for j in range(0, dim, LANES):
        k = tirx.BufferLoad(keys, [*key_index, tirx.Ramp(j, 1, LANES)])
        q = tirx.BufferLoad(q_scaled, [bh, tirx.Ramp(j, 1, LANES)])
        terms.append(q * k.astype(f"float32x{LANES}"))
    return _lane_sum(tree_sum(terms))


class PagedKeys:
    """Keys and values of one sequence and KV head in the paged cache (sliding window aware)."""

    def __init__(self, pages, page_table, length_info, seq, first_page, kv_head, q_scaled, row, sliding_window, skip=0):
        self.pages, self.page_table, self.length_info, self.seq = pages, page_table, length_info, seq
        self.first_page, self.kv_head, self.q_scaled, self.row = first_page, kv_head, q_scaled, row
        self.sliding_window, self.skip = sliding_window, skip  # skip: cached tokens before key 0

    def _slot(self, i):
        pos = _get_seq_offset(self.skip + i, self.seq, self.length_info, self.sliding_window)
        page_size = self.pages.shape[3]
        return self.page_table[self.first_page + pos // page_size], pos % page_size

    def score(self, i):
        page, offset = self._slot(i)
        return _dot(self.q_scaled, self.row, self.pages, (page, 0, self.kv_head, offset), int(self.pages.shape[4]))

    def value(self, i, d):
        page, offset = self._slot(i)
        return self.pages[page, 1, self.kv_head, offset, d]


class RaggedKeys:
    """Keys and values of one sequence and KV head given as ragged [tokens, heads, dim] arrays."""

    def __init__(self, k, v, first, kv_head, q_scaled, row):
        self.k, self.v, self.first, self.kv_head, self.q_scaled, self.row = k, v, first, kv_head, q_scaled, row

    def score(self, i):
        return _dot(self.q_scaled, self.row, self.k, (self.first + i, self.kv_head), int(self.k.shape[2]))

    def value(self, i, d):
        return self.v[self.first + i, self.kv_head, d]


def decode_attention(h_kv: int, h_qo: int, dim: int, page_size: int, dtype: str, sliding_window: bool):
    """Drop-in for TVM's `batch_decode_paged_kv_cpu`: one query per sequence against its paged K/V."""
    group = h_qo // h_kv
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
        # Per (sequence, head) state, allocated once outside the parallel loop (a buffer allocated inside it
        # costs a workspace call per iteration).
        q_scaled = T.alloc_buffer((B * h_qo, dim), "float32")
        out = T.alloc_buffer((B * h_qo, dim), "float32")
        scores = T.alloc_buffer((B * h_qo, TILE), "float32")
        state = T.alloc_buffer((B * h_qo, 3), "float32")
        for bh in T.parallel(B * h_qo):
            b: T.let[T.int32] = bh // h_qo
            h: T.let[T.int32] = bh % h_qo
            begin: T.let[T.int32] = page_table_indptr[b]
            end: T.let[T.int32] = page_table_indptr[b + 1]
            length: T.let[T.int32] = T.if_then_else(
                begin != end, _get_kv_chunk_len(end - begin, page_size, b, length_info, sliding_window), 0
            )
            for d in T.vectorized(dim):
                q_scaled[bh, d] = T.Cast("float32", Q[b, h, d]) * (sm_scale * LOG2E)
                out[bh, d] = T.float32(0)

            keys = T.meta_var(
                PagedKeys(pages, page_table_values, length_info, b, begin, h // group, q_scaled, bh, sliding_window)
            )
            _attend(bh, length, keys, scores, state, out, dim)
            _finish(output, lse, b, h, bh, out, state, dim)

    return kernel


def prefill_ragged_attention(h_kv: int, h_q: int, d_qk: int, d_v: int, dtype: str):
    """Drop-in for TVM's CPU `batch_prefill_ragged_kv`: the new tokens of each sequence attend to each
    other (causally when `causal`), K and V given as ragged arrays, not pages."""
    group = h_q // h_kv

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
        T.func_attr({"tirx.is_scheduled": True})
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
        state = T.alloc_buffer((qo_len * h_q, 3), "float32")
        _rows_to_sequences(q_indptr, batch_size, sequence_of)
        for qh in T.parallel(qo_len * h_q):
            row: T.let[T.int32] = qh // h_q
            h: T.let[T.int32] = qh % h_q
            b: T.let[T.int32] = sequence_of[row]
            q_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
            k_len: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
            # Causal: query i of the chunk sees the cached prefix and the chunk's first i + 1 tokens.
            length: T.let[T.int32] = T.if_then_else(causal > 0, k_len - q_len + (row - q_indptr[b]) + 1, k_len)
            for d in T.vectorized(d_qk):
                q_scaled[qh, d] = T.Cast("float32", q[row, h, d]) * (sm_scale * LOG2E)
            for d in T.vectorized(d_v):
                out[qh, d] = T.float32(0)

            keys = T.meta_var(RaggedKeys(k, v, kv_indptr[b], h // group, q_scaled, qh))
            _attend(qh, length, keys, scores, state, out, d_v)
            _finish(output, lse, row, h, qh, out, state, d_v)

    return kernel


def prefill_paged_attention(
    h_kv: int, h_q: int, dim: int, page_size: int, dtype: str, sliding_window: bool, window_size: int
):
    """Drop-in for TVM's `batch_prefill_paged_kv_cpu`: each new token attends to its sequence's cached
    (paged) tokens, with TVM's masks (causal, or the sliding window's view of the past)."""
    group = h_q // h_kv
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
        sequence_of = T.alloc_buffer((total_len,), "int32")
        q_scaled = T.alloc_buffer((total_len * h_q, dim), "float32")
        out = T.alloc_buffer((total_len * h_q, dim), "float32")
        scores = T.alloc_buffer((total_len * h_q, TILE), "float32")
        state = T.alloc_buffer((total_len * h_q, 3), "float32")
        _rows_to_sequences(q_indptr, batch_size, sequence_of)
        for qh in T.parallel(total_len * h_q):
            row: T.let[T.int32] = qh // h_q
            h: T.let[T.int32] = qh % h_q
            b: T.let[T.int32] = sequence_of[row]
            i: T.let[T.int32] = row - q_indptr[b]
            q_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
            begin: T.let[T.int32] = page_indptr[b]
            end: T.let[T.int32] = page_indptr[b + 1]
            kv_len: T.let[T.int32] = T.if_then_else(
                begin != end, _get_kv_chunk_len(end - begin, page_size, b, length_info, sliding_window), 0
            )
            # TVM's masks as a key range [first, last): a sliding window sees its last `window - i - 1`
            # cached tokens; causal sees the cache up to its own position; otherwise all of it.
            first: T.let[T.int32] = T.if_then_else(
                causal > 0 and window > 0, T.max(kv_len - T.max(window - i - 1, 0), 0), 0
            )
            last: T.let[T.int32] = T.if_then_else(
                causal > 0 and window == 0, T.min(kv_len, kv_len - q_len + i + 1), kv_len
            )
            for d in T.vectorized(dim):
                q_scaled[qh, d] = T.Cast("float32", q[row, h, d]) * (sm_scale * LOG2E)
                out[qh, d] = T.float32(0)
            keys = T.meta_var(
                PagedKeys(pages, page_values, length_info, b, begin, h // group, q_scaled, qh, sliding_window, first)
            )
            _attend(qh, T.max(last - first, 0), keys, scores, state, out, dim)
            _finish(output, lse, row, h, qh, out, state, dim)

    return kernel


def _static(shape) -> list[int | None]:
    return [int(x) if isinstance(x, tirx.IntImm) else None for x in shape]


def _replacement(func: tirx.PrimFunc, window_size: int | None) -> tirx.PrimFunc | None:
    """A fast kernel with the same signature as TVM's, or None when the kernel or its shapes don't suit.

    window_size: the sliding window the cache was made with (its kernels have it built in)."""
    symbol = str(func.attrs["global_symbol"]) if func.attrs and "global_symbol" in func.attrs else ""
    if symbol.startswith(DECODE_SYMBOL):
        q, pages = func.params[0], func.params[1]  # buffer-typed parameters
        (_, h_qo, dim), (_, _, h_kv, page_size, _) = _static(q.shape), _static(pages.shape)
        if None in (h_qo, dim, h_kv, page_size) or dim % LANES:
            return None
        return decode_attention(h_kv, h_qo, dim, page_size, str(q.dtype), symbol.endswith("_sliding_window"))
    if symbol.startswith(PAGED_PREFILL_SYMBOL) and len(func.params) == 15:
        q, pages = func.params[0], func.params[2]
        (_, h_q, dim), (_, _, h_kv, page_size, _) = _static(q.shape), _static(pages.shape)
        sliding = symbol.endswith("_sliding_window")
        if None in (h_q, dim, h_kv, page_size) or dim % LANES or (sliding and not window_size):
            return None
        faster = prefill_paged_attention(h_kv, h_q, dim, page_size, str(q.dtype), sliding, window_size or 0)
        return faster.with_attrs(func.attrs)
    if symbol == RAGGED_PREFILL_SYMBOL and len(func.params) == 14:
        q, k, v = func.params[0], func.params[2], func.params[3]
        (_, h_q, d_qk), (_, h_kv, _), (_, _, d_v) = _static(q.shape), _static(k.shape), _static(v.shape)
        if None in (h_q, d_qk, h_kv, d_v) or d_qk % LANES:
            return None
        faster = prefill_ragged_attention(h_kv, h_q, d_qk, d_v, str(q.dtype))
        return faster.with_attrs(func.attrs) if func.attrs else faster
    return None


def cpu_attention(window_size: int | None) -> tvm.transform.Pass:
    """Swap TVM's CPU attention kernels (decode, ragged and paged prefill) for parallel, vectorized ones."""

    @tvm.transform.module_pass(opt_level=0, name="MlccCPUAttention")
    def swap(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc):
                faster = _replacement(func, window_size)
                if faster is not None:
                    mod[gv] = faster
        return mod

    return swap
