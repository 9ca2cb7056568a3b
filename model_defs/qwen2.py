"""Qwen2: the Llama model with q/k/v bias and no output-projection bias."""

from __future__ import annotations

from typing import Any

from artifacts.errors import MlccError
from model_defs.llama import LlamaConfig, LlamaModel, map_hf_name


def config_from_hf(cfg: dict[str, Any]) -> LlamaConfig:
    config = LlamaConfig.from_hf(cfg)
    config.qkv_bias, config.o_bias = True, False
    if cfg.get("use_sliding_window"):
        raise MlccError("Qwen2 with use_sliding_window=true is not supported yet")
    return config


Model = LlamaModel
__all__ = ["Model", "config_from_hf", "map_hf_name"]
