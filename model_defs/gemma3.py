"""Gemma 3 (text): interleaved sliding-window and global attention layers with their own RoPE bases,
RMSNorm on q and k, GeLU-tanh MLP, norms after attention and MLP too, embeddings scaled by sqrt(hidden).

The model applies RoPE itself (the KV cache's RoPE has one base for all layers): from a GGUF file in llama.cpp's
arithmetic (q scaled before the dot products), from an HF checkpoint in transformers'. Gemma 3 4B and larger scale
the global layers' RoPE frequencies linearly (by 1/8); the sliding layers are never scaled, in transformers as in
llama.cpp. Norm weights follow the GGUF convention, where Gemma's (1 + w) is already folded into w
(`convert_hf_tensor` folds it for HF).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from artifacts.errors import MlccError
from model_defs.common import (
    AttentionLayout,
    GeGLU,
    ModelConfig,
    NeoxRope,
    RopeTables,
    hf_get,
    hf_rope,
    map_name,
    rope_attention,
)
from model_defs.gemma import convert_hf_tensor, embedding_scale

SLIDING = "sliding_attention"
ROPE_KINDS = ("default", "linear")  # of the global layers (Gemma 3 4B and up: linear, factor 8)
# cos and sin of the layer's RoPE base: NeoxRope's (llama.cpp's arithmetic) or RopeTables' (transformers').
RopeInput = tuple[Tensor, Tensor]


@dataclass
class Gemma3Config(ModelConfig):
    rms_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_theta: float = 10_000.0  # sliding-window layers
    sliding_window: int | None = 512
    sliding_window_pattern: int = 6  # every 6th layer is global
    query_scale: float = 256**-0.5
    tie_embeddings: bool = True
    context_window: int = 32768
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # global layers
    layer_types: list[str] = field(default_factory=list)  # HF's per-layer kinds; else the pattern decides
    hf_arithmetic: bool = False  # RoPE and query scaling as transformers computes them (HF checkpoints)
    qk_norm: bool = True  # Gemma 2 has none
    attn_softcap: float = 0.0  # Gemma 2: scores become cap * tanh(score / cap); 0 for none
    final_softcap: float = 0.0  # Gemma 2: the same on the logits

    def is_sliding(self, layer: int) -> bool:
        if not self.sliding_window:
            return False
        if self.layer_types:
            return self.layer_types[layer] == SLIDING
        return (layer + 1) % self.sliding_window_pattern != 0

    def rope(self, sliding: bool) -> RopeTables:
        if sliding:
            return RopeTables.from_config(self.rope_local_theta, self.head_dim, {}, self.context_window)
        return RopeTables.from_config(self.rope_theta, self.head_dim, self.rope_scaling, self.context_window)


def config_from_gguf(meta: dict[str, Any], has_output: bool) -> Gemma3Config:
    heads = meta["attention.head_count"]
    head_dim = meta.get("attention.key_length", meta["embedding_length"] // heads)
    # not stored: llama.cpp takes hidden / heads for the 27B shape (62 layers), head_dim otherwise, as does this
    query_scalar = meta["embedding_length"] // heads if meta["block_count"] == 62 else head_dim
    return Gemma3Config(
        vocab_size=meta["vocab_size"],
        hidden_size=meta["embedding_length"],
        intermediate_size=meta["feed_forward_length"],
        num_layers=meta["block_count"],
        num_heads=heads,
        num_kv_heads=meta.get("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.get("rope.freq_base", 1_000_000.0)),
        rope_local_theta=float(meta.get("rope.freq_base_swa", 10_000.0)),
        sliding_window=meta.get("attention.sliding_window"),
        query_scale=float(np.float32(1) / np.sqrt(np.float32(query_scalar))),  # as llama.cpp rounds it
        tie_embeddings=not has_output,
        context_window=int(meta.get("context_length", 32768)),
        rope_scaling=gguf_rope_scaling(meta),
    )


def gguf_rope_scaling(meta: dict[str, Any]) -> dict[str, Any]:
    """The global layers' RoPE scaling as llama.cpp reads it: `rope.scaling.factor` (or the older
    `rope.scale_linear`) of the kind `rope.scaling.type`, linear when the type is absent, none when it is "none"."""
    factor = float(meta.get("rope.scaling.factor") or meta.get("rope.scale_linear") or 1.0)
    kind = str(meta.get("rope.scaling.type", "linear"))
    if factor == 1.0 or kind == "none":
        return {}
    if kind != "linear":
        raise MlccError(f"unsupported RoPE scaling {kind!r} in a Gemma 3 GGUF file; supported: linear")
    return {"rope_type": "linear", "factor": factor}


def config_from_hf(cfg: dict[str, Any]) -> Gemma3Config:
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    head_dim = hf_get(cfg, "head_dim", default=cfg["hidden_size"] // heads)
    params = cfg.get("rope_parameters") or {}
    if SLIDING in params:  # transformers 5: RoPE parameters per layer kind
        theta, scaling = hf_rope({"rope_parameters": params.get("full_attention", {})}, ROPE_KINDS)
        local_theta, _ = hf_rope({"rope_parameters": params[SLIDING]}, ("default",))
    else:
        theta, scaling = hf_rope(cfg, ROPE_KINDS)
        local_theta = float(cfg.get("rope_local_base_freq", 10_000.0))
    pattern = int(hf_get(cfg, "sliding_window_pattern", "_sliding_window_pattern", default=6))
    default_types = [SLIDING if (i + 1) % pattern else "full_attention" for i in range(layers)]
    config = Gemma3Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf_get(cfg, "num_key_value_heads", default=heads),
        head_dim=head_dim,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        sliding_window=cfg.get("sliding_window") or None,
        context_window=int(hf_get(cfg, "max_position_embeddings", default=32768)),
        rms_eps=float(hf_get(cfg, "rms_norm_eps", default=1e-6)),
        rope_theta=theta,
        rope_local_theta=local_theta,
        sliding_window_pattern=pattern,
        query_scale=float(hf_get(cfg, "query_pre_attn_scalar", default=head_dim)) ** -0.5,
        rope_scaling=scaling,
        layer_types=list(cfg.get("layer_types") or default_types),
        hf_arithmetic=True,
    )
    config.rope(sliding=False)  # a one-line error for RoPE scaling it does not know
    return config


HF_NAME_MAP: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.post_attention_norm.weight"),
    (r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.weight", r"blk.\1.post_ffw_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", r"blk.\1.attn_\2_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight", r"blk.\1.attn_\2.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2.weight"),
]


def map_hf_name(name: str) -> str | None:
    return map_name(HF_NAME_MAP, name)


class Block(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer: int):
        self.cfg, self.layer = cfg, layer
        h, hd = cfg.hidden_size, cfg.head_dim
        norm = lambda n: nn.RMSNorm(n, -1, cfg.rms_eps, bias=False)  # noqa: E731
        self.attn_norm = norm(h)
        self.attn_q = nn.Linear(h, cfg.num_heads * hd, bias=False)
        self.attn_k = nn.Linear(h, cfg.num_kv_heads * hd, bias=False)
        self.attn_v = nn.Linear(h, cfg.num_kv_heads * hd, bias=False)
        if cfg.qk_norm:
            self.attn_q_norm = norm(hd)
            self.attn_k_norm = norm(hd)
        self.attn_output = nn.Linear(cfg.num_heads * hd, h, bias=False)
        self.post_attention_norm = norm(h)
        self.ffn_norm = norm(h)
        self.ffn_gate = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.ffn_up = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.ffn_down = nn.Linear(cfg.intermediate_size, h, bias=False)
        self.post_ffw_norm = norm(h)
        if cfg.is_sliding(layer):
            self.rope = NeoxRope(cfg.rope_local_theta, hd)
        else:  # llama.cpp's freq_scale: 1.0f / factor
            factor = np.float32(cfg.rope_scaling.get("factor", 1.0))
            self.rope = NeoxRope(cfg.rope_theta, hd, float(np.float32(1) / factor))
        self.ffn_act = GeGLU()

    def attention(self, x: Tensor, kv: PagedKVCache, rope: RopeInput) -> Tensor:
        c = self.cfg
        b, s, _ = x.shape
        q = op.reshape(self.attn_q(x), (b, s, c.num_heads, c.head_dim))  # [b, s, hq, d]
        k = op.reshape(self.attn_k(x), (b, s, c.num_kv_heads, c.head_dim))  # [b, s, hkv, d]
        v = op.reshape(self.attn_v(x), (b, s, c.num_kv_heads, c.head_dim))
        if c.qk_norm:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        if c.hf_arithmetic:
            return self.attn_output(rope_attention(kv, self.layer, q, k, v, rope, c.query_scale))
        q = self.rope.rotate(q, *rope) * c.query_scale  # scaled before the dot products, as llama.cpp does
        qkv = op.concat([q, self.rope.rotate(k, *rope), v], dim=2)
        out = kv.attention_with_fused_qkv(self.layer, qkv, c.num_heads, sm_scale=1.0)  # [b, s, hq, d]
        return self.attn_output(op.reshape(out, (b, s, c.num_heads * c.head_dim)))

    def forward(self, x: Tensor, kv: PagedKVCache, rope: RopeInput) -> Tensor:
        x = x + self.post_attention_norm(self.attention(self.attn_norm(x), kv, rope))
        h = self.ffn_norm(x)
        h = self.ffn_down(self.ffn_act(self.ffn_gate(h), self.ffn_up(h)))
        return x + self.post_ffw_norm(h)


class Gemma3Model(nn.Module):
    def __init__(self, cfg: Gemma3Config):
        self.cfg = cfg
        self.token_embd = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blk = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_layers)])
        self.output_norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_eps, bias=False)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.hf_arithmetic:
            self.rope_local, self.rope_global = cfg.rope(sliding=True), cfg.rope(sliding=False)

    def embed(self, ids: Tensor) -> Tensor:
        if self.cfg.hf_arithmetic:
            return self.token_embd(ids) * embedding_scale(self.cfg.hidden_size)
        return self.token_embd(ids) * float(np.sqrt(np.float32(self.cfg.hidden_size)))  # [n, h], sqrtf's rounding

    def body(self, x: Tensor, kv: PagedKVCache) -> Tensor:
        b, s, _ = x.shape
        positions = kv.get_query_positions(b * s)  # [b*s]
        tables: dict[bool, RopeInput] = {}  # one per RoPE base, for all the layers that share it
        for i, block in enumerate(self.blk):
            sliding = self.cfg.is_sliding(i)
            if sliding not in tables:
                if self.cfg.hf_arithmetic:
                    tables[sliding] = (self.rope_local if sliding else self.rope_global).tables(positions, b, s)
                else:
                    tables[sliding] = block.rope.tables(positions)
            x = block(x, kv, tables[sliding])
        return self.output_norm(x)

    def head(self, x: Tensor) -> Tensor:
        logits = self.output(x)  # [b, s, vocab]
        cap = self.cfg.final_softcap
        return op.tanh(logits / cap) * cap if cap else logits

    def attention_layout(self) -> AttentionLayout:
        c = self.cfg
        return AttentionLayout(
            num_layers=c.num_layers,
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            rope_theta=c.rope_theta,
            layer_windows=[c.sliding_window if c.is_sliding(i) else None for i in range(c.num_layers)],
            model_applies_rope=True,
            attn_softcap=c.attn_softcap,
        )


Model = Gemma3Model
__all__ = ["Model", "config_from_gguf", "config_from_hf", "convert_hf_tensor", "map_hf_name"]
