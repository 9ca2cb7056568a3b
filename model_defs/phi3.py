"""Phi-3 / Phi-3.5 mini: the Llama block with fused q/k/v and gate/up projections, optional sliding window,
and LongRoPE (short and long frequency factors, chosen per sequence by its length, and an attention factor).

The model applies RoPE itself, as transformers computes it. Weights are named after llama.cpp's GGUF tensors,
which keep the fusions (`attn_qkv`, gate then up in `ffn_up`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from model_defs.common import (
    DecoderModel,
    ModelConfig,
    RopeTables,
    SwiGLU,
    hf_get,
    hf_rope,
    hf_rotary_dim,
    map_name,
    rope_attention,
)


@dataclass
class Phi3Config(ModelConfig):
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    rotary_dim: int = 0
    original_context_window: int | None = None  # LongRoPE switches to the long factors beyond it

    def rope(self) -> RopeTables:
        return RopeTables.from_config(
            self.rope_theta, self.rotary_dim, self.rope_scaling, self.context_window, self.original_context_window
        )


def config_from_hf(cfg: dict[str, Any]) -> Phi3Config:
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = hidden // heads
    theta, scaling = hf_rope(cfg)
    config = Phi3Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf_get(cfg, "num_key_value_heads", default=heads),
        head_dim=head_dim,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=cfg.get("sliding_window") or None,
        context_window=int(hf_get(cfg, "max_position_embeddings", default=4096)),
        rms_eps=float(hf_get(cfg, "rms_norm_eps", default=1e-5)),
        rope_theta=theta,
        rope_scaling={k: v for k, v in scaling.items() if k != "partial_rotary_factor"},
        rotary_dim=hf_rotary_dim(cfg, head_dim),
        original_context_window=hf_get(cfg, "original_max_position_embeddings"),
    )
    config.rope()  # reject bad RoPE parameters now, with a one-line error
    return config


def config_from_gguf(meta: dict[str, Any], has_output: bool) -> Phi3Config:
    """Config from llama.cpp's `phi3` metadata; LongRoPE's factors come from its `rope_factors_*` tensors."""
    heads, hidden = meta["attention.head_count"], meta["embedding_length"]
    head_dim = hidden // heads
    scaling: dict[str, Any] = {}
    if "rope_factors_long" in meta:
        scaling = {
            "rope_type": "longrope",
            "long_factor": meta["rope_factors_long"],
            "short_factor": meta["rope_factors_short"],
            "attention_factor": float(meta.get("rope.scaling.attn_factor", 1.0)),
        }
    config = Phi3Config(
        vocab_size=meta["vocab_size"],
        hidden_size=hidden,
        intermediate_size=meta["feed_forward_length"],
        num_layers=meta["block_count"],
        num_heads=heads,
        num_kv_heads=meta.get("attention.head_count_kv", heads),
        head_dim=head_dim,
        tie_embeddings=not has_output,
        sliding_window=meta.get("attention.sliding_window") or None,
        context_window=int(meta.get("context_length", 4096)),
        rms_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rotary_dim=int(meta.get("rope.dimension_count", head_dim)),
        original_context_window=meta.get("rope.scaling.original_context_length"),
    )
    config.rope()
    return config


class Block(nn.Module):
    def __init__(self, cfg: Phi3Config):
        self.cfg = cfg
        h, hd = cfg.hidden_size, cfg.head_dim
        self.attn_norm = nn.RMSNorm(h, -1, cfg.rms_eps, bias=False)
        # The linears in the checkpoint's module order (o_proj before qkv_proj), which adapter slots record.
        self.attn_output = nn.Linear(cfg.num_heads * hd, h, bias=False)
        self.attn_qkv = nn.Linear(h, (cfg.num_heads + 2 * cfg.num_kv_heads) * hd, bias=False)
        self.ffn_norm = nn.RMSNorm(h, -1, cfg.rms_eps, bias=False)
        self.ffn_up = nn.Linear(h, 2 * cfg.intermediate_size, bias=False)  # gate rows, then up rows
        self.ffn_down = nn.Linear(cfg.intermediate_size, h, bias=False)
        self.ffn_act = SwiGLU()

    def attention(self, x: Tensor, kv: PagedKVCache, layer: int, rope: tuple[Tensor, Tensor]) -> Tensor:
        c = self.cfg
        b, s, _ = x.shape
        qkv = op.reshape(self.attn_qkv(x), (b, s, c.num_heads + 2 * c.num_kv_heads, c.head_dim))
        q, k, v = op.split(qkv, [c.num_heads, c.num_heads + c.num_kv_heads], axis=2)  # [b, s, h*, d]
        return self.attn_output(rope_attention(kv, layer, q, k, v, rope, c.head_dim**-0.5))

    def mlp(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.ffn_up(x), 2, axis=-1)  # [b, s, i] each
        return self.ffn_down(self.ffn_act(gate, up))

    def forward(self, x: Tensor, kv: PagedKVCache, layer: int, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.attention(self.attn_norm(x), kv, layer, rope)
        return x + self.mlp(self.ffn_norm(x))


class Phi3Model(DecoderModel):
    def __init__(self, cfg: Phi3Config):
        self.cfg, self.rope = cfg, cfg.rope()
        self.token_embd = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blk = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.output_norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_eps, bias=False)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


HF_NAME_MAP: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight", r"blk.\1.attn_qkv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight", r"blk.\1.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"blk.\1.ffn_down.weight"),
]


def map_hf_name(name: str) -> str | None:
    return map_name(HF_NAME_MAP, name)


Model = Phi3Model
