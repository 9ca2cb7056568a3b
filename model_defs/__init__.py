"""Architectures mlcc compiles. Each module provides `config_from_hf`, `Model` and `map_hf_name`."""

from __future__ import annotations

import importlib
from types import ModuleType

from artifacts.errors import MlccError

ARCHITECTURES = {"llama": "model_defs.llama", "mistral": "model_defs.mistral", "qwen2": "model_defs.qwen2"}


def get_arch(name: str) -> ModuleType:
    """The module of an architecture, or a one-line error listing the supported ones."""
    key = name.lower()
    if key not in ARCHITECTURES:
        raise MlccError(f"unsupported architecture {name!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return importlib.import_module(ARCHITECTURES[key])
