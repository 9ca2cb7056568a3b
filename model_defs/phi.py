"""Phi-2 (and Phi-1/1.5): one LayerNorm (with bias) feeding attention and the MLP in parallel, partial rotary
embeddings, a GeLU-tanh MLP (`fc1`, `fc2`) and biases on every linear layer including the output head.

The model applies RoPE itself. Weights are named after llama.cpp's GGUF tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from model_defs.common import (
    DecoderModel,
    ModelConfig,
    RopeTables,
    hf_get,
    hf_rope,
    hf_rotary_dim,
    map_name,
    rope_attention,
)


@dataclass
class PhiConfig(ModelConfig):
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary_dim: int = 0
    qk_layernorm: bool = False


def config_from_hf(cfg: dict[str, Any]) -> PhiConfig:
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = hidden // heads
    theta, _ = hf_rope(cfg)
    return PhiConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf_get(cfg, "num_key_value_heads", default=heads),
        head_dim=head_dim,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        context_window=int(hf_get(cfg, "max_position_embeddings", default=2048)),
        norm_eps=float(hf_get(cfg, "layer_norm_eps", default=1e-5)),
        rope_theta=theta,
        rotary_dim=hf_rotary_dim(cfg, head_dim),
        qk_layernorm=bool(cfg.get("qk_layernorm", False)),
    )


def config_from_gguf(meta: dict[str, Any], has_output: bool) -> PhiConfig:
    """Config from llama.cpp's `phi2` metadata."""
    heads, hidden = meta["attention.head_count"], meta["embedding_length"]
    head_dim = hidden // heads
    return PhiConfig(
        vocab_size=meta["vocab_size"],
        hidden_size=hidden,
        intermediate_size=meta["feed_forward_length"],
        num_layers=meta["block_count"],
        num_heads=heads,
        num_kv_heads=meta.get("attention.head_count_kv", heads),
        head_dim=head_dim,
        tie_embeddings=not has_output,
        context_window=int(meta.get("context_length", 2048)),
        norm_eps=float(meta.get("attention.layer_norm_epsilon", 1e-5)),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
        rotary_dim=int(meta.get("rope.dimension_count", head_dim)),
    )


class Block(nn.Module):
    def __init__(self, cfg: PhiConfig):
        self.cfg = cfg
        h, hd = cfg.hidden_size, cfg.head_dim
        self.attn_norm = nn.LayerNorm(h, cfg.norm_eps)
        self.attn_q = nn.Linear(h, cfg.num_heads * hd, bias=True)
        self.attn_k = nn.Linear(h, cfg.num_kv_heads * hd, bias=True)
        self.attn_v = nn.Linear(h, cfg.num_kv_heads * hd, bias=True)
        if cfg.qk_layernorm:
            self.attn_q_norm = nn.LayerNorm(hd, cfg.norm_eps)
            self.attn_k_norm = nn.LayerNorm(hd, cfg.norm_eps)
        self.attn_output = nn.Linear(cfg.num_heads * hd, h, bias=True)
        self.ffn_up = nn.Linear(h, cfg.intermediate_size, bias=True)
        self.ffn_down = nn.Linear(cfg.intermediate_size, h, bias=True)

    def attention(self, x: Tensor, kv: PagedKVCache, layer: int, rope: tuple[Tensor, Tensor]) -> Tensor:
        c = self.cfg
        b, s, _ = x.shape
        q = op.reshape(self.attn_q(x), (b, s, c.num_heads, c.head_dim))  # [b, s, hq, d]
        k = op.reshape(self.attn_k(x), (b, s, c.num_kv_heads, c.head_dim))  # [b, s, hkv, d]
        v = op.reshape(self.attn_v(x), (b, s, c.num_kv_heads, c.head_dim))
        if c.qk_layernorm:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        return self.attn_output(rope_attention(kv, layer, q, k, v, rope, c.head_dim**-0.5))

    def forward(self, x: Tensor, kv: PagedKVCache, layer: int, rope: tuple[Tensor, Tensor]) -> Tensor:
        h = self.attn_norm(x)
        mlp = self.ffn_down(op.gelu(self.ffn_up(h), approximate="tanh"))
        return x + self.attention(h, kv, layer, rope) + mlp


class PhiModel(DecoderModel):
    def __init__(self, cfg: PhiConfig):
        self.cfg, self.rope = cfg, RopeTables.from_config(cfg.rope_theta, cfg.rotary_dim, {}, cfg.context_window)
        self.token_embd = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blk = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.output_norm = nn.LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)


HF_NAME_MAP: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.final_layernorm\.(weight|bias)", r"output_norm.\1"),
    (r"lm_head\.(weight|bias)", r"output.\1"),
    (r"model\.layers\.(\d+)\.input_layernorm\.(weight|bias)", r"blk.\1.attn_norm.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"blk.\1.attn_\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_layernorm\.(weight|bias)", r"blk.\1.attn_\2_norm.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.dense\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"model\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blk.\1.ffn_up.\2"),
    (r"model\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blk.\1.ffn_down.\2"),
]


def map_hf_name(name: str) -> str | None:
    return map_name(HF_NAME_MAP, name)


Model = PhiModel
