"""Gemma 3 (text): interleaved sliding-window and global attention layers with their own RoPE bases,
RMSNorm on q and k, GeLU-tanh MLP, norms after attention and MLP too, embeddings scaled by sqrt(hidden).

The model applies RoPE itself (the KV cache's RoPE has one base for all layers). Norm weights follow the
GGUF convention, where the converter has already folded Gemma's (1 + w) into w.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from artifacts.errors import MlccError
from model_defs.common import AttentionLayout


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
        sliding_window=meta.get("attention.sliding_window"),
        query_scale=head_dim**-0.5,
        tie_embeddings=not has_output,
        context_window=int(meta.get("context_length", 32768)),
    )


def config_from_hf(cfg: dict[str, Any]) -> Gemma3Config:
    raise MlccError("Gemma 3 from safetensors is not supported yet; compile its GGUF file")


def map_hf_name(name: str) -> str | None:
    raise KeyError(name)


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate-half RoPE on x [b, s, h, d] at the token positions [b*s], computed in float32."""

    def compute(xt: te.Tensor, pos: te.Tensor) -> te.Tensor:
        _, seq, _, dim = xt.shape
        half = dim // 2

        def angle(t, i):
            exponent = i.astype("float32") * 2.0 / tirx.const(int(dim), "float32")
            return pos[t].astype("float32") / tirx.power(tirx.const(theta, "float32"), exponent)

        # cos and sin once per (token, frequency), not once per head and element: they dominate otherwise.
        cos = te.compute((pos.shape[0], half), lambda t, i: tirx.cos(angle(t, i)), name="rope_cos")
        sin = te.compute((pos.shape[0], half), lambda t, i: tirx.sin(angle(t, i)), name="rope_sin")

        def body(b, s, h, d):
            t = b * seq + s
            rotated = tirx.if_then_else(d < half, -xt[b, s, h, d + half], xt[b, s, h, d - half])
            value = xt[b, s, h, d].astype("float32") * cos[t, d % half] + rotated.astype("float32") * sin[t, d % half]
            return value.astype(xt.dtype)

        return te.compute(xt.shape, body, name="rope")

    return op.tensor_expr_op(compute, "rope", [x, positions])


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

    def attention(self, x: Tensor, kv: PagedKVCache, positions: Tensor) -> Tensor:
        c = self.cfg
        b, s, _ = x.shape
        theta = c.rope_local_theta if c.is_sliding(self.layer) else c.rope_theta
        q = self.attn_q_norm(op.reshape(self.attn_q(x), (b, s, c.num_heads, c.head_dim)))  # [b, s, hq, d]
        k = self.attn_k_norm(op.reshape(self.attn_k(x), (b, s, c.num_kv_heads, c.head_dim)))  # [b, s, hkv, d]
        v = op.reshape(self.attn_v(x), (b, s, c.num_kv_heads, c.head_dim))
        qkv = op.concat([rope(q, positions, theta), rope(k, positions, theta), v], dim=2)
        out = kv.attention_with_fused_qkv(self.layer, qkv, c.num_heads, sm_scale=c.query_scale)  # [b, s, hq, d]
        return self.attn_output(op.reshape(out, (b, s, c.num_heads * c.head_dim)))

    def forward(self, x: Tensor, kv: PagedKVCache, positions: Tensor) -> Tensor:
        x = x + self.post_attention_norm(self.attention(self.attn_norm(x), kv, positions))
        h = self.ffn_norm(x)
        h = self.ffn_down(op.gelu(self.ffn_gate(h), approximate="tanh") * self.ffn_up(h))
        return x + self.post_ffw_norm(h)


class Gemma3Model(nn.Module):
    def __init__(self, cfg: Gemma3Config):
        self.cfg = cfg
        self.token_embd = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blk = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_layers)])
        self.output_norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_eps, bias=False)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, ids: Tensor) -> Tensor:
        return self.token_embd(ids) * math.sqrt(self.cfg.hidden_size)  # [n, h]

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
