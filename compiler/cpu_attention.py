"""A faster CPU decode-attention kernel for TVM's paged KV cache.

TVM 0.27's CPU decode kernel walks one (sequence, head) at a time on one thread, with scalar loops and a
softmax rescale of the whole output row after every cached token; at a context of a few hundred tokens it
costs as much as all the model's matmuls. This kernel keeps TVM's signature and arithmetic (online softmax
in base 2) but runs (sequence, head) pairs in parallel, scores 16 cached tokens at a time with 8-wide vector
dot products, and rescales once per 16 tokens.

mlcc's caches apply RoPE when K is appended (or the model applies it), never inside attention, so the kernel
reads K as stored and ignores `rotary_mode`.
"""

from __future__ import annotations

import math

import tvm
from tvm import tirx
from tvm.relax.frontend.nn.llm._kernel_common import _declare_length_info, _get_kv_chunk_len, _get_seq_offset
from tvm.script import tirx as T

TILE = 16  # cached tokens scored per softmax update
LANES = 8
DECODE_SYMBOL = "batch_decode_paged_kv_cpu"


def _tree_sum(terms: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def _lane_sum(v: tirx.PrimExpr) -> tirx.PrimExpr:
    return _tree_sum([tirx.Shuffle([v], [tirx.IntImm("int32", i)]) for i in range(LANES)])


def decode_attention(h_kv: int, h_qo: int, dim: int, page_size: int, dtype: str, sliding_window: bool):
    group = h_qo // h_kv
    log2e = math.log2(math.e)
    symbol = DECODE_SYMBOL + ("_sliding_window" if sliding_window else "")

    def score(q_scaled, bh, pages, page_no, kv_head, offset):
        """q . k for one cached token, as a tree of 8-wide products."""
        terms = []
        for j in range(0, dim, LANES):
            k = tirx.BufferLoad(pages, [page_no, 0, kv_head, offset, tirx.Ramp(j, 1, LANES)])
            q = tirx.BufferLoad(q_scaled, [bh, tirx.Ramp(j, 1, LANES)])
            terms.append(q * k.astype(f"float32x{LANES}"))
        return _lane_sum(_tree_sum(terms))

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
        state = T.alloc_buffer((B * h_qo, 3), "float32")  # running max, running sum, new max
        for bh in T.parallel(B * h_qo):
            b: T.let[T.int32] = bh // h_qo
            h: T.let[T.int32] = bh % h_qo
            begin: T.let[T.int32] = page_table_indptr[b]
            end: T.let[T.int32] = page_table_indptr[b + 1]
            length: T.let[T.int32] = T.if_then_else(
                begin != end, _get_kv_chunk_len(end - begin, page_size, b, length_info, sliding_window), 0
            )
            for d in T.vectorized(dim):
                q_scaled[bh, d] = T.Cast("float32", Q[b, h, d]) * (sm_scale * log2e)
                out[bh, d] = T.float32(0)
            state[bh, 0] = T.float32(-5e4)
            state[bh, 1] = T.float32(1)  # as TVM's kernel: a phantom entry that vanishes once a score arrives
            for tile in range((length + TILE - 1) // TILE):
                state[bh, 2] = state[bh, 0]
                for r in range(TILE):
                    row: T.let[T.int32] = tile * TILE + r
                    if row < length:
                        pos: T.let[T.int32] = _get_seq_offset(row, b, length_info, sliding_window)
                        page_no: T.let[T.int32] = page_table_values[begin + pos // page_size]
                        s = T.meta_var(score(q_scaled, bh, pages, page_no, h // group, pos % page_size))
                        scores[bh, r] = s
                        state[bh, 2] = T.max(state[bh, 2], scores[bh, r])
                rescale: T.let[T.float32] = T.exp2(state[bh, 0] - state[bh, 2])
                state[bh, 1] = state[bh, 1] * rescale
                for d in T.vectorized(dim):
                    out[bh, d] = out[bh, d] * rescale
                for r in range(TILE):
                    row2: T.let[T.int32] = tile * TILE + r
                    if row2 < length:
                        pos2: T.let[T.int32] = _get_seq_offset(row2, b, length_info, sliding_window)
                        page2: T.let[T.int32] = page_table_values[begin + pos2 // page_size]
                        p: T.let[T.float32] = T.exp2(scores[bh, r] - state[bh, 2])
                        state[bh, 1] = state[bh, 1] + p
                        for d in T.vectorized(dim):
                            out[bh, d] = out[bh, d] + p * T.Cast(
                                "float32", pages[page2, 1, h // group, pos2 % page_size, d]
                            )
                state[bh, 0] = state[bh, 2]
            for d in T.vectorized(dim):
                output[b, h, d] = T.Cast(dtype, out[bh, d] / state[bh, 1])
            lse[b, h] = state[bh, 0] + T.log2(state[bh, 1])

    return kernel


def _replacement(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """A fast kernel with the same signature as TVM's, or None when the shapes don't suit it."""
    symbol = str(func.attrs["global_symbol"]) if func.attrs and "global_symbol" in func.attrs else ""
    if not symbol.startswith(DECODE_SYMBOL):
        return None
    q_buf, pages_buf = func.params[0], func.params[1]  # buffer-typed parameters
    _, h_qo, dim = (int(x) if isinstance(x, tirx.IntImm) else None for x in q_buf.shape)
    _, _, h_kv, page_size, _ = (int(x) if isinstance(x, tirx.IntImm) else None for x in pages_buf.shape)
    if None in (h_qo, dim, h_kv, page_size) or dim % LANES:
        return None
    sliding = symbol.endswith("_sliding_window")
    return decode_attention(h_kv, h_qo, dim, page_size, str(q_buf.dtype), sliding)


@tvm.transform.module_pass(opt_level=0, name="MlccCPUAttention")
def cpu_attention(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Swap TVM's CPU decode-attention kernels for the parallel, vectorized one."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc):
            faster = _replacement(func)
            if faster is not None:
                mod[gv] = faster
    return mod
