"""The functions every compiled model exports, written once for all architectures.

A model provides `embed(ids)`, `body(x, kv)`, `head(x)` and `attention_layout()`; this module wraps it into
`batch_prefill`, `batch_decode` and `create_paged_kv_cache`, the calls the runtime makes.
"""

from __future__ import annotations

from typing import Any

from tvm import relax as rx
from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from kernels.numerics import Numerics
from kernels.rope import RopeSpec
from model_defs.common import AttentionLayout

# Parameters are passed as one packed tuple, in the order the manifest lists them.
PARAM_PREFIX = "model."


class EntryPoints(nn.Module):
    def __init__(self, model: nn.Module, target: Target, dtype: str, numerics: Numerics = Numerics.MLCC):
        self.model = model
        self.target = target
        self.dtype = dtype
        self.numerics = numerics  # LLAMACPP: llama.cpp's arithmetic in the cache's RoPE and attention kernels
        self.layout: AttentionLayout = model.attention_layout()

    def _logits(self, x: Tensor) -> Tensor:
        logits = self.model.head(x)
        return logits.astype("float32") if logits.dtype != "float32" else logits

    def batch_prefill(self, input_ids: Tensor, logit_positions: Tensor, paged_kv_cache: PagedKVCache):
        """Prefill several sequences concatenated into one ragged row; logits at `logit_positions`."""
        return self._prefill(input_ids, logit_positions, paged_kv_cache)

    def batch_prefill_by_length(
        self, input_ids: Tensor, logit_positions: Tensor, sequence_lengths: Tensor, paged_kv_cache: PagedKVCache
    ):
        """batch_prefill of a model whose RoPE depends on a sequence's length (LongRoPE, exported under the same
        name): `sequence_lengths` [n] holds each token's whole prompt length."""
        return self._prefill(input_ids, logit_positions, paged_kv_cache, sequence_lengths)

    def _prefill(self, input_ids: Tensor, logit_positions: Tensor, kv: PagedKVCache, lengths: Tensor | None = None):
        x = self.model.embed(input_ids)  # [n, h]
        x = op.reshape(x, (1, x.shape[0], x.shape[1]))  # [1, n, h]
        x = self.model.body(x, kv) if lengths is None else self.model.body(x, kv, lengths)  # [1, n, h]
        x = op.take(x, logit_positions, axis=1)  # [1, b, h]
        logits = self._logits(x)  # [1, b, vocab]
        return op.reshape(logits, (logits.shape[1], logits.shape[2])), kv  # [b, vocab]

    def batch_decode(self, input_ids: Tensor, paged_kv_cache: PagedKVCache):
        """One new token for each of b sequences."""
        x = self.model.embed(input_ids)  # [b, h]
        x = op.reshape(x, (x.shape[0], 1, x.shape[1]))  # [b, 1, h]
        logits = self._logits(self.model.body(x, paged_kv_cache))  # [b, 1, vocab]
        return op.reshape(logits, (logits.shape[0], logits.shape[2])), paged_kv_cache  # [b, vocab]

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
            return RopeSpec(lay.rope_theta, rotary_dim, *heads, self.dtype, numerics=self.numerics)
        if lay.model_applies_rope or kind not in ("default", "gptj"):
            return None
        return RopeSpec(lay.rope_theta, rotary_dim, *heads, self.dtype, gptj=kind == "gptj", numerics=self.numerics)

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
            dtype=self.dtype,
            target=self.target,
            layer_sliding_window_size=self.kv_window,
        )

    def spec(self) -> dict[str, Any]:
        packed = {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        prefill = {
            "input_ids": nn.spec.Tensor(["seq_len"], "int32"),
            "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
            "paged_kv_cache": kv,
            "$": packed,
        }
        if self.layout.rope_switch_length:
            prefill = nn.spec.MethodSpec.from_raw(
                {**prefill, "sequence_lengths": nn.spec.Tensor(["seq_len"], "int32")}, self.batch_prefill_by_length
            )
        return {
            "batch_prefill": prefill,
            "batch_decode": {
                "input_ids": nn.spec.Tensor(["batch_size"], "int32"),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "create_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
