"""A compiler pass that swaps TVM 0.27's serial, scalar CPU kernels of the paged KV cache (decode attention,
paged and ragged prefill attention, the RoPE applied to q and k) for mlcc's (tir_kernels/attention.py,
tir_kernels/rope.py), in the build's numerics.

A kernel is swapped only where mlcc's has TVM's kernel's very signature (the same parameters, of the same
kinds, in the same order); otherwise TVM's stays.
"""

from __future__ import annotations

import tvm
from tvm import tirx

from artifacts.errors import MlccError
from tir_kernels.attention import (
    DECODE_SYMBOL,
    LANES,
    PAGED_PREFILL_SYMBOL,
    RAGGED_PREFILL_SYMBOL,
    decode_attention,
    prefill_paged_attention,
    prefill_ragged_attention,
)
from tir_kernels.numerics import Numerics
from tir_kernels.rope import SYMBOL as ROPE_SYMBOL
from tir_kernels.rope import RopeSpec, split_rotary
from tir_kernels.simd import vector_registers


def _static(shape) -> list[int | None]:
    return [int(x) if isinstance(x, tirx.IntImm) else None for x in shape]


def _same_signature(theirs: tirx.PrimFunc, ours: tirx.PrimFunc) -> bool:
    """The same parameters in the same order: scalars of the same type, buffers of the same rank and type."""
    if len(theirs.params) != len(ours.params):
        return False
    return all(_kind(a) == _kind(b) for a, b in zip(theirs.params, ours.params))


def _kind(param) -> tuple:
    """A parameter's kind: ("buffer", dtype, rank), or its scalar type."""
    if type(param.ty).__name__ == "BufferType":
        return ("buffer", str(param.dtype), len(param.shape))
    return ("scalar", str(param.ty))


def _attention(
    func: tirx.PrimFunc, symbol: str, window_size: int | None, numerics: Numerics, softcap: float
) -> tirx.PrimFunc | None:
    """mlcc's kernel for TVM's attention kernel `func`, or None when it is none of them or its shapes don't suit.

    window_size: the sliding window the cache was made with (its kernels have it built in); LLAMACPP numerics:
    decode and ragged prefill compute as llama.cpp does (paged prefill, a continuation of a cached prefix,
    keeps the fast kernel)."""
    sliding = symbol.endswith("_sliding_window")
    target = tvm.target.Target.current(allow_none=True)
    wide = target is not None and vector_registers(target) >= 32  # AVX-512: 512-bit vectors
    if symbol.startswith(DECODE_SYMBOL):
        q, pages = func.params[0], func.params[1]  # buffer-typed parameters
        (_, h_qo, dim), (_, _, h_kv, page_size, _) = _static(q.shape), _static(pages.shape)
        if None in (h_qo, dim, h_kv, page_size) or dim % LANES:
            return None
        return decode_attention(h_kv, h_qo, dim, page_size, str(q.dtype), sliding, numerics, softcap, wide)
    if symbol.startswith(PAGED_PREFILL_SYMBOL):
        q, pages = func.params[0], func.params[2]
        (_, h_q, dim), (_, _, h_kv, page_size, _) = _static(q.shape), _static(pages.shape)
        if None in (h_q, dim, h_kv, page_size) or dim % LANES or (sliding and not window_size):
            return None
        faster = prefill_paged_attention(
            h_kv, h_q, dim, page_size, str(q.dtype), sliding, window_size or 0, softcap, wide
        )
        return faster.with_attrs(func.attrs)
    if symbol == RAGGED_PREFILL_SYMBOL:
        q, k, v = func.params[0], func.params[2], func.params[3]
        (_, h_q, d_qk), (_, h_kv, _), (_, _, d_v) = _static(q.shape), _static(k.shape), _static(v.shape)
        if None in (h_q, d_qk, h_kv, d_v) or d_qk % LANES:
            return None
        ragged_numerics = numerics if d_qk == d_v else Numerics.MLCC
        faster = prefill_ragged_attention(
            h_kv, h_q, d_qk, d_v, str(q.dtype), ragged_numerics, softcap, head_pairs=wide, wide=wide
        )
        return faster.with_attrs(func.attrs) if func.attrs else faster
    return None


def _rope(func: tirx.PrimFunc, spec: RopeSpec | None) -> tirx.PrimFunc | None:
    """mlcc's kernel for TVM's RoPE kernel `func`, or None when it does not apply."""
    if spec is None or spec.rotary_dim % 2 or spec.rotary_dim > spec.head_dim:
        return None
    return split_rotary(spec)


def cpu_attention(
    window_size: int | None,
    rope: RopeSpec | None = None,
    numerics: Numerics = Numerics.MLCC,
    softcap: float = 0.0,
) -> tvm.transform.Pass:
    """Swap TVM's CPU attention kernels (decode, ragged and paged prefill) and, given the cache's RoPE, its
    RoPE kernel for parallel, vectorized ones; `numerics`: LLAMACPP for attention as llama.cpp computes it
    (not with soft-capping, which llama.cpp's order does not have); `softcap`: attention scores soft-capped
    (Gemma 2), which TVM's kernels cannot do."""
    attention_numerics = Numerics.MLCC if softcap else numerics

    @tvm.transform.module_pass(opt_level=0, name="MlccCPUAttention")
    def swap(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            symbol = str(func.attrs["global_symbol"]) if func.attrs and "global_symbol" in func.attrs else ""
            is_attention = symbol.startswith((DECODE_SYMBOL, PAGED_PREFILL_SYMBOL)) or symbol == RAGGED_PREFILL_SYMBOL
            if symbol == ROPE_SYMBOL:
                faster = _rope(func, rope)
            elif is_attention:
                faster = _attention(func, symbol, window_size, attention_numerics, softcap)
            else:
                continue
            if faster is not None and not _same_signature(func, faster):
                faster = None
            if faster is None and softcap and is_attention:
                raise MlccError("attention soft-capping needs head_dim a multiple of 8 and static head counts")
            if faster is not None:
                mod[gv] = faster
        return mod

    return swap
