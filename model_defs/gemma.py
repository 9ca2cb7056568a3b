"""Gemma (1): the Llama block with RMSNorm scaled by (1 + w), a GeGLU MLP (GeLU-tanh), embeddings scaled by
sqrt(hidden) and a head_dim of its own (256; multi-query attention on the 2B shape).

The model applies RoPE itself. Norm weights follow the GGUF convention, where the 1 is already folded into w
(`convert_hf_tensor` folds it for HF checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from model_defs.common import DecoderModel, GeGLU, ModelConfig, RopeTables, hf_get, hf_rope, map_name, rope_attention


@dataclass
class GemmaConfig(ModelConfig):
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    tie_embeddings: bool = True


def config_from_hf(cfg: dict[str, Any]) -> GemmaConfig:
    heads = cfg["num_attention_heads"]
    theta, scaling = hf_rope(cfg)
    config = GemmaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf_get(cfg, "num_key_value_heads", default=heads),
        head_dim=hf_get(cfg, "head_dim", default=cfg["hidden_size"] // heads),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        context_window=int(hf_get(cfg, "max_position_embeddings", default=8192)),
        rms_eps=float(hf_get(cfg, "rms_norm_eps", default=1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
    )
    RopeTables.from_config(theta, config.head_dim, scaling, config.context_window)  # one-line error if unsupported
    return config


def config_from_gguf(meta: dict[str, Any], has_output: bool) -> GemmaConfig:
    """Config from llama.cpp's `gemma` metadata (norms stored with the 1 folded in, as the model wants)."""
    heads = meta["attention.head_count"]
    return GemmaConfig(
        vocab_size=meta["vocab_size"],
        hidden_size=meta["embedding_length"],
        intermediate_size=meta["feed_forward_length"],
        num_layers=meta["block_count"],
        num_heads=heads,
        num_kv_heads=meta.get("attention.head_count_kv", heads),
        head_dim=meta.get("attention.key_length", meta["embedding_length"] // heads),
        tie_embeddings=not has_output,
        context_window=int(meta.get("context_length", 8192)),
        rms_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
    )


class Block(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        self.cfg = cfg
        h, hd = cfg.hidden_size, cfg.head_dim
        self.attn_norm = nn.RMSNorm(h, -1, cfg.rms_eps, bias=False)
        self.attn_q = nn.Linear(h, cfg.num_heads * hd, bias=False)
        self.attn_k = nn.Linear(h, cfg.num_kv_heads * hd, bias=False)
        self.attn_v = nn.Linear(h, cfg.num_kv_heads * hd, bias=False)
        self.attn_output = nn.Linear(cfg.num_heads * hd, h, bias=False)
        self.ffn_norm = nn.RMSNorm(h, -1, cfg.rms_eps, bias=False)
        self.ffn_gate = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.ffn_up = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.ffn_down = nn.Linear(cfg.intermediate_size, h, bias=False)
        self.ffn_act = GeGLU()

    def attention(self, x: Tensor, kv: PagedKVCache, layer: int, rope: tuple[Tensor, Tensor]) -> Tensor:
        c = self.cfg
        b, s, _ = x.shape
        q = op.reshape(self.attn_q(x), (b, s, c.num_heads, c.head_dim))  # [b, s, hq, d]
        k = op.reshape(self.attn_k(x), (b, s, c.num_kv_heads, c.head_dim))  # [b, s, hkv, d]
        v = op.reshape(self.attn_v(x), (b, s, c.num_kv_heads, c.head_dim))
        return self.attn_output(rope_attention(kv, layer, q, k, v, rope, c.head_dim**-0.5))

    def forward(self, x: Tensor, kv: PagedKVCache, layer: int, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.attention(self.attn_norm(x), kv, layer, rope)
        h = self.ffn_norm(x)
        return x + self.ffn_down(self.ffn_act(self.ffn_gate(h), self.ffn_up(h)))


class GemmaModel(DecoderModel):
    def __init__(self, cfg: GemmaConfig):
        self.cfg = cfg
        self.rope = RopeTables.from_config(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling, cfg.context_window)
        self.token_embd = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blk = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.output_norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_eps, bias=False)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, ids: Tensor) -> Tensor:
        return self.token_embd(ids) * embedding_scale(self.cfg.hidden_size)  # [n, h]


def embedding_scale(hidden: int) -> float:
    """sqrt(hidden) in float32, as transformers multiplies Gemma's embeddings."""
    return float(np.float32(hidden**0.5))


HF_NAME_MAP: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight", r"blk.\1.attn_\2.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2.weight"),
]


def map_hf_name(name: str) -> str | None:
    return map_name(HF_NAME_MAP, name)


def convert_hf_tensor(name: str, array: np.ndarray) -> np.ndarray:
    """Gemma's norms multiply by (1 + w); the model (like GGUF files) stores 1 + w."""
    return (array.astype(np.float32) + np.float32(1)) if name.endswith("norm.weight") else array


Model = GemmaModel
