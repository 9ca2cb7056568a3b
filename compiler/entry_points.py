"""The functions every compiled model exports, written once for all architectures.

A model provides `embed(ids)`, `body(x, kv)`, `head(x)` and `attention_layout()`; this module wraps it into
`batch_prefill`, `batch_decode` and `create_paged_kv_cache`, the calls the runtime makes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvm import relax as rx
from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from model_defs.common import AttentionLayout
from tir_kernels.numerics import Numerics
from tir_kernels.rope import RopeSpec

# Parameters are passed as one packed tuple, in the order the manifest lists them.
PARAM_PREFIX = "model."


class CacheInDtype:
    """The paged KV cache as a model sees it when the cache holds another type than the activations (float16
    K/V under float32 activations): q, k and v go in cast to the cache's type, the attention comes back in the
    activations'. Everything else is the cache's own."""

    def __init__(self, cache: PagedKVCache, cache_dtype: str, dtype: str):
        self.cache, self.cache_dtype, self.dtype = cache, cache_dtype, dtype

    def attention_with_fused_qkv(self, layer_id: int, qkv: Tensor, num_qo_heads: int, sm_scale: float) -> Tensor:
        qkv = qkv.astype(self.cache_dtype)  # [b, s, hq+2hkv, d]
        out = self.cache.attention_with_fused_qkv(layer_id, qkv, num_qo_heads, sm_scale=sm_scale)  # [b, s, hq, d]
        return out.astype(self.dtype)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)


class EntryPoints(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        target: Target,
        dtype: str,
        numerics: Numerics = Numerics.MLCC,
        kv_dtype: str | None = None,
    ):
        self.model = model
        self.target = target
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype  # the KV cache's elements (and the cache's RoPE and attention kernels')
        self.numerics = numerics  # LLAMACPP: llama.cpp's arithmetic in the cache's RoPE and attention kernels
        self.layout: AttentionLayout = model.attention_layout()

    def _cache_view(self, cache: PagedKVCache) -> PagedKVCache | CacheInDtype:
        return cache if self.kv_dtype == self.dtype else CacheInDtype(cache, self.kv_dtype, self.dtype)

    def _logits(self, x: Tensor) -> Tensor:
        logits = self.model.head(x)
        return logits.astype("float32") if logits.dtype != "float32" else logits

    def batch_prefill(
        self,
        input_ids: Tensor,
        logit_positions: Tensor,
        paged_kv_cache: PagedKVCache,
        sequence_lengths: Tensor | None = None,
        scaling_rows: Tensor | None = None,
        lora_scalings: Tensor | None = None,
    ):
        """Prefill several sequences concatenated into one ragged row; logits at `logit_positions`.
        `sequence_lengths` [n]: each token's whole prompt length, for a model whose RoPE depends on it (LongRoPE);
        `scaling_rows` [n] and `lora_scalings` [rows, modules, slots]: each token's scalings of the adapter slots,
        for a library with adapter slots (compiler/lora_slots.py), which also returns the final hidden states of
        every token [n, h] (what X-LoRA's classifier reads)."""
        self._set_adapters(scaling_rows, lora_scalings)
        x = self.model.embed(input_ids)  # [n, h]
        x = op.reshape(x, (1, x.shape[0], x.shape[1]))  # [1, n, h]
        lengths = () if sequence_lengths is None else (sequence_lengths,)
        hidden = self.model.body(x, self._cache_view(paged_kv_cache), *lengths)  # [1, n, h]
        logits = self._logits(op.take(hidden, logit_positions, axis=1))  # [1, b, vocab]
        logits = op.reshape(logits, (logits.shape[1], logits.shape[2]))  # [b, vocab]
        if self.adapter_slots is None:
            return logits, paged_kv_cache
        return logits, op.reshape(hidden, (hidden.shape[1], hidden.shape[2])), paged_kv_cache

    def batch_decode(
        self,
        input_ids: Tensor,
        paged_kv_cache: PagedKVCache,
        scaling_rows: Tensor | None = None,
        lora_scalings: Tensor | None = None,
    ):
        """One new token for each of b sequences (adapter scalings and hidden states [b, h] as in batch_prefill)."""
        self._set_adapters(scaling_rows, lora_scalings)
        x = self.model.embed(input_ids)  # [b, h]
        x = op.reshape(x, (x.shape[0], 1, x.shape[1]))  # [b, 1, h]
        hidden = self.model.body(x, self._cache_view(paged_kv_cache))  # [b, 1, h]
        logits = self._logits(hidden)  # [b, 1, vocab]
        logits = op.reshape(logits, (logits.shape[0], logits.shape[2]))  # [b, vocab]
        if self.adapter_slots is None:
            return logits, paged_kv_cache
        return logits, op.reshape(hidden, (hidden.shape[0], hidden.shape[2])), paged_kv_cache

    @property
    def adapter_slots(self) -> Any:
        """The model's adapter slots (compiler/lora_slots.py), or None."""
        return getattr(self.model, "lora_slots", None)

    def _set_adapters(self, scaling_rows: Tensor | None, lora_scalings: Tensor | None) -> None:
        if scaling_rows is not None and lora_scalings is not None:
            self.adapter_slots.set_inputs(scaling_rows, lora_scalings)

    @property
    def kv_window(self) -> int:
        """The sliding window the cache's kernels are built with (TVM wants one even when no layer slides)."""
        return self.layout.sliding_window or 1024

    @property
    def cache_rope(self) -> RopeSpec | None:
        """The RoPE the cache applies, when it has no frequency scaling (the CPU build has a faster kernel)."""
        lay = self.layout
        kind = lay.rope_scaling.get("rope_type", "default")
        rotary_dim = lay.rotary_dim or lay.head_dim
        heads = (lay.head_dim, lay.num_heads, lay.num_kv_heads)
        if lay.model_applies_rope and self.numerics == Numerics.LLAMACPP:  # only splits q, k, v; K, V to float16
            return RopeSpec(lay.rope_theta, rotary_dim, *heads, self.kv_dtype, numerics=self.numerics)
        if lay.model_applies_rope or kind not in ("default", "gptj"):
            return None
        return RopeSpec(lay.rope_theta, rotary_dim, *heads, self.kv_dtype, gptj=kind == "gptj", numerics=self.numerics)

    def create_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        lay = self.layout
        window = lay.sliding_window
        kinds = ["mha_sliding" if w else "mha" for w in lay.layer_windows]
        if window and "mha" not in kinds:
            # TVM 0.27's cache allocates its prefill scratch buffers only when some layer is plain "mha";
            # an unused trailing layer of that kind makes all-sliding models (Mistral) work.
            kinds.append("mha")
        return TIRPagedKVCache(
            attn_kind=kinds if window else "mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, len(kinds)]),
            num_hidden_layers=len(kinds),
            num_attention_heads=lay.num_heads,
            num_key_value_heads=lay.num_kv_heads,
            qk_head_dim=lay.head_dim,
            v_head_dim=lay.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NONE if lay.model_applies_rope else RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=lay.rope_theta,
            rope_scaling=dict(lay.rope_scaling),
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=lay.rotary_dim or lay.head_dim,
            enable_disaggregation=False,
            dtype=self.kv_dtype,
            target=self.target,
            layer_sliding_window_size=self.kv_window,
        )

    def spec(self) -> dict[str, Any]:
        """The runtime's calls. Optional inputs come before the cache, in the order the methods declare them,
        and only where the model needs them (the runtime passes them by the manifest)."""
        kv = nn.spec.Object(object_type=PagedKVCache)
        tokens, sequences = nn.spec.Tensor(["seq_len"], "int32"), nn.spec.Tensor(["batch_size"], "int32")
        prefill = {"input_ids": tokens, "logit_positions": sequences}
        if self.layout.rope_switch_length:
            prefill["sequence_lengths"] = tokens
        decode = {"input_ids": sequences}
        slots = self.adapter_slots
        if slots is not None:
            table = nn.spec.Tensor(["scaling_table_rows", slots.modules, slots.slots], "float32")
            prefill["scaling_rows"], decode["scaling_rows"] = tokens, sequences
            prefill["lora_scalings"] = decode["lora_scalings"] = table
        return {
            "batch_prefill": self._method(self.batch_prefill, prefill, kv),
            "batch_decode": self._method(self.batch_decode, decode, kv),
            "create_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }

    @staticmethod
    def _method(run: Callable[..., Any], inputs: dict[str, Any], kv: Any) -> nn.spec.MethodSpec:
        """`run` exported with `inputs` and then the KV cache as its arguments (by name, so optional inputs
        can be left out)."""
        names = [*inputs, "paged_kv_cache"]

        def method(*values: Any) -> Any:
            return run(**dict(zip(names, values)))

        return nn.spec.MethodSpec(method, names, [*inputs.values(), kv], param_mode="packed", effect_mode="none")
