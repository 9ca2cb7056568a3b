"""Gemma 2: Gemma 3's layer without the q/k norms, one RoPE base for all layers, every other layer sliding
(the first one), and soft-capped attention scores and logits (cap * tanh(x / cap)).

Soft-capped attention scores need mlcc's CPU attention kernels (compiler/cpu_attention.py).
"""

from __future__ import annotations

from typing import Any

from artifacts.errors import MlccError
from model_defs import gemma3
from model_defs.gemma import convert_hf_tensor
from model_defs.gemma3 import Gemma3Config, Gemma3Model, map_hf_name


def config_from_hf(cfg: dict[str, Any]) -> Gemma3Config:
    config = gemma3.config_from_hf({"sliding_window_pattern": 2, **cfg})  # layers 0, 2, 4, ... slide
    config.rope_local_theta = config.rope_theta
    config.qk_norm = False
    config.attn_softcap = float(cfg.get("attn_logit_softcapping") or 0.0)
    config.final_softcap = float(cfg.get("final_logit_softcapping") or 0.0)
    return refuse_rope_scaling(config)


def refuse_rope_scaling(config: Gemma3Config) -> Gemma3Config:
    """Gemma 2 would scale every layer's RoPE (one rotary embedding), Gemma 3's config only the global ones';
    no Gemma 2 release scales."""
    if config.rope_scaling:
        raise MlccError(f"Gemma 2 with RoPE scaling ({config.rope_scaling['rope_type']}) is not supported")
    return config


def config_from_gguf(meta: dict[str, Any], has_output: bool) -> Gemma3Config:
    """Config from llama.cpp's `gemma2` metadata. The query scale is not stored: llama.cpp takes
    1/sqrt(hidden / heads) for the 27B shape (46 layers) and 1/sqrt(head_dim) otherwise, as does this."""
    config = gemma3.config_from_gguf(meta, has_output)
    heads = meta["attention.head_count"]
    scalar = config.hidden_size / heads if config.num_layers == 46 else config.head_dim
    config.query_scale = float(scalar) ** -0.5
    config.rope_local_theta = config.rope_theta = float(meta.get("rope.freq_base", 10000.0))
    config.sliding_window_pattern = 2
    config.layer_types = [gemma3.SLIDING if i % 2 == 0 else "full_attention" for i in range(config.num_layers)]
    config.context_window = int(meta.get("context_length", 8192))
    config.hf_arithmetic = True  # no llama.cpp-exact kernels for Gemma 2 yet
    config.qk_norm = False
    config.attn_softcap = float(meta.get("attn_logit_softcapping") or 0.0)
    config.final_softcap = float(meta.get("final_logit_softcapping") or 0.0)
    return refuse_rope_scaling(config)


Model = Gemma3Model
__all__ = ["Model", "config_from_gguf", "config_from_hf", "convert_hf_tensor", "map_hf_name"]
