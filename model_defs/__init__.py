"""The architectures mlcc compiles: one registry entry each, from which the CLI's help, every error message and
the README's table are written.

An entry names the module that implements the architecture (imported only when used, so that `--help` and
error messages need no TVM). The module provides:

- `Model(config)`: the nn.Module (`embed`, `body`, `head`, `attention_layout`);
- `config_from_hf(config_json) -> config` and, for GGUF files, `config_from_gguf(metadata, has_output)`;
  configs derive from `model_defs.common.ModelConfig`;
- `map_hf_name(hf_name) -> model name | None` and optionally `convert_hf_tensor(name, array) -> array`
  (e.g. Gemma's norms stored as w where the model multiplies by 1 + w).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from artifacts.errors import MlccError


class ArchModule(Protocol):
    Model: Callable[[Any], Any]
    config_from_hf: Callable[[dict[str, Any]], Any]
    map_hf_name: Callable[[str], str | None]


@dataclass(frozen=True)
class Architecture:
    name: str
    module: str
    hf_model_types: tuple[str, ...] = ()  # config.json `model_type` values; () when compiled from GGUF only
    gguf_arch: str | None = None  # llama.cpp's `general.architecture`; None when not read from GGUF yet
    checked: str = ""  # what the tests compare it with, for the README
    # A metadata key (without the architecture's prefix) whose non-zero value tells this architecture's files from
    # others of the same `general.architecture` (llama.cpp writes Mixtral as `llama` with `expert_count`).
    gguf_marker: str | None = None

    def load(self) -> ArchModule:
        return importlib.import_module(self.module)

    def convert_hf_tensor(self, name: str, array: np.ndarray) -> np.ndarray:
        convert = getattr(self.load(), "convert_hf_tensor", None)
        return convert(name, array) if convert else array


REGISTRY: list[Architecture] = [
    Architecture(
        "llama",
        "model_defs.llama",
        ("llama",),
        "llama",
        "tiny HF models vs transformers; SmolLM2 GGUF vs transformers and llama.cpp",
    ),
    Architecture(
        "mistral", "model_defs.mistral", ("mistral",), None, "tiny HF model vs transformers, prompts beyond the window"
    ),
    Architecture(
        "qwen2", "model_defs.qwen2", ("qwen2",), None, "tiny HF models vs transformers (float32, float16, q4)"
    ),
    Architecture(
        "phi3",
        "model_defs.phi3",
        ("phi3",),
        "phi3",
        "tiny HF model vs transformers, LongRoPE on both sides of the switch; its GGUF equals the HF build",
    ),
    Architecture(
        "phi", "model_defs.phi", ("phi",), "phi2", "tiny HF model vs transformers; its GGUF equals the HF build"
    ),
    Architecture(
        "gemma", "model_defs.gemma", ("gemma",), "gemma", "tiny HF model vs transformers; its GGUF equals the HF build"
    ),
    Architecture(
        "gemma2",
        "model_defs.gemma2",
        ("gemma2",),
        "gemma2",
        "tiny HF model vs transformers, beyond the window; its GGUF equals the HF build; CPU targets only",
    ),
    Architecture(
        "gemma3",
        "model_defs.gemma3",
        ("gemma3_text",),
        "gemma3",
        "tiny HF models vs transformers, linear RoPE scaling as 4B+; its GGUF equals the HF build; Gemma 3 270M GGUF"
        " vs transformers and llama.cpp",
    ),
    Architecture(
        "mixtral",
        "model_defs.mixtral",
        ("mixtral",),
        "llama",
        "tiny HF models (4 and 8 experts, top-2) vs transformers, beyond the window; the same as GGUF",
        gguf_marker="expert_count",
    ),
]
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in REGISTRY}


def supported(source: str = "any") -> list[str]:
    """Names of the architectures compiled from `source`: "hf", "gguf" or "any"."""
    return sorted(a.name for a in REGISTRY if source == "any" or (a.hf_model_types if source == "hf" else a.gguf_arch))


def get_arch(name: str) -> ArchModule:
    """The module of an architecture, or a one-line error listing the supported ones."""
    return get_entry(name).load()


def get_entry(name: str) -> Architecture:
    entry = ARCHITECTURES.get(name.lower())
    if entry is None:
        raise MlccError(f"unsupported architecture {name!r}; supported: {', '.join(supported())}")
    return entry


def arch_for_model_type(model_type: str) -> Architecture:
    """The architecture of an HF config.json `model_type`, or a one-line error listing the supported ones."""
    for entry in REGISTRY:
        if model_type.lower() in entry.hf_model_types:
            return entry
    types = sorted(t for a in REGISTRY for t in a.hf_model_types)
    raise MlccError(
        f"unsupported architecture {model_type or 'unknown'!r} in config.json; supported: {', '.join(types)}"
    )


def arch_for_gguf(gguf_arch: str, meta: dict[str, Any] | None = None) -> Architecture:
    """The architecture of a GGUF file's `general.architecture` and metadata (keys without its prefix)."""
    meta = meta or {}
    found = [e for e in REGISTRY if e.gguf_arch == gguf_arch and (e.gguf_marker is None or meta.get(e.gguf_marker))]
    if found:
        return max(found, key=lambda e: e.gguf_marker is not None)  # a marked entry is the more specific
    raise MlccError(f"unsupported GGUF architecture {gguf_arch!r}; supported: {', '.join(supported('gguf'))}")


def markdown_table() -> str:
    """The README's table of architectures, sources and what each is checked against."""
    rows = ["| Architecture | HF safetensors (`model_type`) | GGUF (`general.architecture`) | Checked against |"]
    rows.append("|---|---|---|---|")
    for a in REGISTRY:
        hf = ", ".join(f"`{t}`" for t in a.hf_model_types) or "—"
        gguf = f"`{a.gguf_arch}`" + (f" with `{a.gguf_marker}`" if a.gguf_marker else "") if a.gguf_arch else "—"
        rows.append(f"| `{a.name}` | {hf} | {gguf} | {a.checked} |")
    return "\n".join(rows)
