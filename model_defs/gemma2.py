"""Gemma 2: Gemma 3's layer without the q/k norms, one RoPE base for all layers, every other layer sliding
(the first one), and soft-capped attention scores and logits (cap * tanh(x / cap)).

Soft-capped attention scores need mlcc's CPU attention kernels (compiler/cpu_attention.py).
"""

from __future__ import annotations

from typing import Any

from model_defs import gemma3
from model_defs.gemma import convert_hf_tensor
from model_defs.gemma3 import Gemma3Config, Gemma3Model, map_hf_name


def config_from_hf(cfg: dict[str, Any]) -> Gemma3Config:
    config = gemma3.config_from_hf({"sliding_window_pattern": 2, **cfg})  # layers 0, 2, 4, ... slide
    config.rope_local_theta = config.rope_theta
    config.qk_norm = False
    config.attn_softcap = float(cfg.get("attn_logit_softcapping") or 0.0)
    config.final_softcap = float(cfg.get("final_logit_softcapping") or 0.0)
    return config


Model = Gemma3Model
__all__ = ["Model", "config_from_hf", "convert_hf_tensor", "map_hf_name"]
