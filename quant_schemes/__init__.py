"""Quantization schemes mlcc can compile a model with."""

from __future__ import annotations

from collections.abc import Callable

from artifacts.errors import MlccError
from quant_schemes.base import QuantScheme, convert_tensor
from quant_schemes.float_schemes import FloatScheme
from quant_schemes.group_quant import GroupQuantScheme

SCHEMES: dict[str, Callable[[], QuantScheme]] = {
    "q0f32": lambda: FloatScheme("q0f32", "float32"),
    "q0f16": lambda: FloatScheme("q0f16", "float16"),
    "q4": lambda: GroupQuantScheme("q4", bits=4, group_size=32),
}


def get_scheme(name: str) -> QuantScheme:
    if name not in SCHEMES:
        raise MlccError(f"unknown quantization {name!r}; known: {', '.join(SCHEMES)}")
    return SCHEMES[name]()


__all__ = ["SCHEMES", "QuantScheme", "convert_tensor", "get_scheme"]
