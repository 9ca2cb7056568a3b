"""Llama: RMSNorm, grouped-query attention with RoPE, SwiGLU MLP.

Mistral (sliding-window attention) and Qwen2 (q/k/v bias) are this model with a different config reader.
Weights are named after GGUF tensors (`token_embd`, `blk.N.attn_q`, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from model_defs.common import AttentionLayout, ModelConfig, SwiGLU, hf_get, hf_rope, map_name


@dataclass
class LlamaConfig(ModelConfig):
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        heads = cfg["num_attention_heads"]
        theta, scaling = hf_rope(cfg)
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf_get(cfg, "num_key_value_heads", default=heads),
            head_dim=hf_get(cfg, "head_dim", default=cfg["hidden_size"] // heads),
            rms_eps=float(hf_get(cfg, "rms_norm_eps", default=1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            context_window=int(hf_get(cfg, "max_position_embeddings", default=4096)),
        )


class Block(nn.Module):
    """One decoder layer; attribute names are the GGUF tensor names."""

    def __init__(self, cfg: LlamaConfig):
        self.cfg = cfg
        h, hd = cfg.hidden_size, cfg.head_dim
        self.attn_norm = nn.RMSNorm(h, -1, cfg.rms_eps, bias=False)
        self.attn_q = nn.Linear(h, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.attn_k = nn.Linear(h, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.attn_v = nn.Linear(h, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.attn_output = nn.Linear(cfg.num_heads * hd, h, bias=cfg.o_bias)
        self.ffn_norm = nn.RMSNorm(h, -1, cfg.rms_eps, bias=False)
        self.ffn_gate = nn.Linear(h, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.ffn_up = nn.Linear(h, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.ffn_down = nn.Linear(cfg.intermediate_size, h, bias=cfg.mlp_bias)
        self.ffn_act = SwiGLU()

    def attention(self, x: Tensor, kv: PagedKVCache, layer: int) -> Tensor:
        c = self.cfg
        b, s, _ = x.shape
        qkv = op.concat([self.attn_q(x), self.attn_k(x), self.attn_v(x)], dim=-1)  # [b, s, (hq+2hkv)*d]
        qkv = op.reshape(qkv, (b, s, c.num_heads + 2 * c.num_kv_heads, c.head_dim))
        out = kv.attention_with_fused_qkv(layer, qkv, c.num_heads, sm_scale=c.head_dim**-0.5)  # [b, s, hq, d]
        return self.attn_output(op.reshape(out, (b, s, c.num_heads * c.head_dim)))

    def mlp(self, x: Tensor) -> Tensor:
        return self.ffn_down(self.ffn_act(self.ffn_gate(x), self.ffn_up(x)))

    def forward(self, x: Tensor, kv: PagedKVCache, layer: int) -> Tensor:
        x = x + self.attention(self.attn_norm(x), kv, layer)
        return x + self.mlp(self.ffn_norm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        self.cfg = cfg
        self.token_embd = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blk = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.output_norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_eps, bias=False)
        # A tied model gets its own copy of the embedding as `output`, so each can be quantized its own way (an
        # artifact stores the two once where they come out the same bytes: compiler/compile.py).
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, ids: Tensor) -> Tensor:
        return self.token_embd(ids)  # [n, h]

    def body(self, x: Tensor, kv: PagedKVCache) -> Tensor:
        for layer, block in enumerate(self.blk):
            x = block(x, kv, layer)
        return self.output_norm(x)  # [b, s, h]

    def head(self, x: Tensor) -> Tensor:
        return self.output(x)  # [b, s, vocab]

    def attention_layout(self) -> AttentionLayout:
        c = self.cfg
        return AttentionLayout(
            num_layers=c.num_layers,
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            rope_theta=c.rope_theta,
            rope_scaling=c.rope_scaling,
            layer_windows=[c.sliding_window] * c.num_layers,
        )


# Hugging Face tensor name -> GGUF tensor name.
HF_NAME_MAP: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"blk.\1.attn_\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)", r"blk.\1.ffn_\2.\3"),
]
# Tensors HF checkpoints carry that the compiled model does not need.
HF_IGNORED = [r".*rotary_emb\.inv_freq"]


def map_hf_name(name: str) -> str | None:
    """GGUF name for an HF tensor name; None for tensors to skip. Raises KeyError for unknown names."""
    if any(re.fullmatch(p, name) for p in HF_IGNORED):
        return None
    return map_name(HF_NAME_MAP, name)


def config_from_gguf(meta: dict[str, Any], has_output: bool) -> LlamaConfig:
    """Config from GGUF metadata (keys without the `llama.` prefix). GGUF stores Q/K rows in the interleaved
    RoPE order llama.cpp uses, hence the GPT-J style rotation."""
    heads = meta["attention.head_count"]
    hidden = meta["embedding_length"]
    return LlamaConfig(
        vocab_size=meta["vocab_size"],
        hidden_size=hidden,
        intermediate_size=meta["feed_forward_length"],
        num_layers=meta["block_count"],
        num_heads=heads,
        num_kv_heads=meta.get("attention.head_count_kv", heads),
        head_dim=meta.get("attention.key_length", hidden // heads),
        rms_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
        rope_scaling={"rope_type": "gptj"},
        tie_embeddings=not has_output,
        context_window=int(meta.get("context_length", 4096)),
    )


config_from_hf = LlamaConfig.from_hf
Model = LlamaModel
