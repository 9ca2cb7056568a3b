"""Quantization schemes mlcc can compile a model with.

A group-quantized scheme names its main format (`q<bits>`, `a` for asymmetric scale + min, `f32` for float32
scales) and carries a mix like llama.cpp's *_M types: the output head gets 6 bits (8 for q6/q8), and at 2-3
bits the embedding, `attn_v` and `ffn_down` get more bits too. Norms and biases always stay float.
"""

from __future__ import annotations

from collections.abc import Callable

from artifacts.errors import MlccError
from quant_schemes.base import QuantScheme, convert_tensor
from quant_schemes.float_schemes import FloatScheme
from quant_schemes.group_quant import GroupQuantFormat, GroupQuantScheme

GROUP_SIZE = 32


def _group_scheme(name: str, bits: int, asymmetric: bool = False, scale_dtype: str = "float16") -> QuantScheme:
    """`bits` for every matrix except the roles llama.cpp's mixes widen (same symmetry and scale type)."""

    def fmt(b: int) -> GroupQuantFormat:
        return GroupQuantFormat(b, GROUP_SIZE, asymmetric and b <= 4, scale_dtype)

    if bits <= 3:
        overrides = {"token_embd": fmt(4), "attn_v": fmt(4), "ffn_down": fmt(bits + 1), "output": fmt(6)}
    elif bits <= 5:
        overrides = {"output": fmt(6)}
    else:
        overrides = {"output": fmt(8)}
    return GroupQuantScheme(name, fmt(bits), {role: f for role, f in overrides.items() if f != fmt(bits)})


SCHEMES: dict[str, Callable[[], QuantScheme]] = {
    "q0f32": lambda: FloatScheme("q0f32", "float32"),
    "q0f16": lambda: FloatScheme("q0f16", "float16"),
    "q2": lambda: _group_scheme("q2", 2),
    "q2a": lambda: _group_scheme("q2a", 2, asymmetric=True),
    "q3": lambda: _group_scheme("q3", 3),
    "q3a": lambda: _group_scheme("q3a", 3, asymmetric=True),
    "q4": lambda: _group_scheme("q4", 4),
    "q4a": lambda: _group_scheme("q4a", 4, asymmetric=True),
    "q4f32": lambda: _group_scheme("q4f32", 4, scale_dtype="float32"),
    "q5": lambda: _group_scheme("q5", 5),
    "q6": lambda: _group_scheme("q6", 6),
    "q8": lambda: _group_scheme("q8", 8),
}


def get_scheme(name: str) -> QuantScheme:
    if name not in SCHEMES:
        known = ", ".join(SCHEMES)
        raise MlccError(
            f"unknown quantization {name!r}; known: {known}, and gguf, gguf-fast or gguf-f32 for GGUF files"
        )
    return SCHEMES[name]()


__all__ = ["SCHEMES", "QuantScheme", "convert_tensor", "get_scheme"]
