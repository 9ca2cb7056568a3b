"""Mistral: the Llama model with sliding-window attention on every layer."""

from __future__ import annotations

from typing import Any

from model_defs.llama import LlamaConfig, LlamaModel, map_hf_name


def config_from_hf(cfg: dict[str, Any]) -> LlamaConfig:
    config = LlamaConfig.from_hf(cfg)
    config.sliding_window = cfg.get("sliding_window") or None
    return config


Model = LlamaModel
__all__ = ["Model", "config_from_hf", "map_hf_name"]
