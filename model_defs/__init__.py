"""Architectures mlcc compiles. Each module provides `config_from_hf`, `Model` and `map_hf_name`."""

from __future__ import annotations

import importlib
from types import ModuleType

from artifacts.errors import MlccError

ARCHITECTURES = {"llama": "model_defs.llama", "mistral": "model_defs.mistral", "qwen2": "model_defs.qwen2"}
# Architectures compiled from GGUF files only (no HF weight-name map yet).
GGUF_ONLY = {"gemma3": "model_defs.gemma3"}


def get_arch(name: str) -> ModuleType:
    """The module of an architecture, or a one-line error listing the supported ones."""
    key = name.lower()
    modules = {**ARCHITECTURES, **GGUF_ONLY}
    if key not in modules:
        raise MlccError(f"unsupported architecture {name!r}; supported: {', '.join(sorted(modules))}")
    return importlib.import_module(modules[key])
