"""Gemma 3 (text): interleaved sliding-window and global attention layers with their own RoPE bases,
RMSNorm on q and k, GeLU-tanh MLP, norms after attention and MLP too, embeddings scaled by sqrt(hidden).

The model applies RoPE itself (the KV cache's RoPE has one base for all layers). Norm weights follow the
GGUF convention, where the converter has already folded Gemma's (1 + w) into w.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from artifacts.errors import MlccError
from model_defs.common import AttentionLayout, GeGLU, NeoxRope


@dataclass
class Gemma3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_theta: float = 10_000.0  # sliding-window layers
    sliding_window: int | None = 512
    sliding_window_pattern: int = 6  # every 6th layer is global
    query_scale: float = 256**-0.5
    tie_embeddings: bool = True
    context_window: int = 32768
    rope_scaling: dict[str, Any] = field(default_factory=dict)

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_window) and (layer + 1) % self.sliding_window_pattern != 0


def config_from_gguf(meta: dict[str, Any], has_output: bool) -> Gemma3Config:
    heads = meta["attention.head_count"]
    head_dim = meta.get("attention.key_length", meta["embedding_length"] // heads)
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
        query_scale=float(np.float32(1) / np.sqrt(np.float32(head_dim))),  # as llama.cpp rounds it
        tie_embeddings=not has_output,
        context_window=int(meta.get("context_length", 32768)),
    )


def config_from_hf(cfg: dict[str, Any]) -> Gemma3Config:
    raise MlccError("Gemma 3 from safetensors is not supported yet; compile its GGUF file")


def map_hf_name(name: str) -> str | None:
    raise KeyError(name)


class Block(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer: int):
        self.cfg, self.layer = cfg, layer
        h, hd = cfg.hidden_size, cfg.head_dim
        norm = lambda n: nn.RMSNorm(n, -1, cfg.rms_eps, bias=False)  # noqa: E731
        self.attn_norm = norm(h)
        self.attn_q = nn.Linear(h, cfg.num_heads * hd, bias=False)
        self.attn_k = nn.Linear(h, cfg.num_kv_heads * hd, bias=False)
        self.attn_v = nn.Linear(h, cfg.num_kv_heads * hd, bias=False)
        self.attn_q_norm = norm(hd)
        self.attn_k_norm = norm(hd)
        self.attn_output = nn.Linear(cfg.num_heads * hd, h, bias=False)
        self.post_attention_norm = norm(h)
        self.ffn_norm = norm(h)
        self.ffn_gate = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.ffn_up = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.ffn_down = nn.Linear(cfg.intermediate_size, h, bias=False)
        self.post_ffw_norm = norm(h)
        self.rope = NeoxRope(cfg.rope_local_theta if cfg.is_sliding(layer) else cfg.rope_theta, hd)
        self.ffn_act = GeGLU()

    def attention(self, x: Tensor, kv: PagedKVCache, positions: Tensor) -> Tensor:
        c = self.cfg
        b, s, _ = x.shape
        q = self.attn_q_norm(op.reshape(self.attn_q(x), (b, s, c.num_heads, c.head_dim)))  # [b, s, hq, d]
        k = self.attn_k_norm(op.reshape(self.attn_k(x), (b, s, c.num_kv_heads, c.head_dim)))  # [b, s, hkv, d]
        v = op.reshape(self.attn_v(x), (b, s, c.num_kv_heads, c.head_dim))
        q = self.rope(q, positions) * c.query_scale  # scaled before the dot products, as llama.cpp does
        qkv = op.concat([q, self.rope(k, positions), v], dim=2)
        out = kv.attention_with_fused_qkv(self.layer, qkv, c.num_heads, sm_scale=1.0)  # [b, s, hq, d]
        return self.attn_output(op.reshape(out, (b, s, c.num_heads * c.head_dim)))

    def forward(self, x: Tensor, kv: PagedKVCache, positions: Tensor) -> Tensor:
        x = x + self.post_attention_norm(self.attention(self.attn_norm(x), kv, positions))
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

    def embed(self, ids: Tensor) -> Tensor:
        return self.token_embd(ids) * float(np.sqrt(np.float32(self.cfg.hidden_size)))  # [n, h], sqrtf's rounding

    def body(self, x: Tensor, kv: PagedKVCache) -> Tensor:
        b, s, _ = x.shape
        positions = kv.get_query_positions(b * s)  # [b*s]
        for block in self.blk:
            x = block(x, kv, positions)
        return self.output_norm(x)

    def head(self, x: Tensor) -> Tensor:
        return self.output(x)

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
        )


Model = Gemma3Model
