"""Unquantized models: every weight stays in float32 (q0f32) or float16 (q0f16)."""

from __future__ import annotations

from tvm.relax.frontend import nn

from quant_schemes.base import QuantScheme


class FloatScheme(QuantScheme):
    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype
        self.description = f"no quantization, {dtype} weights and activations"

    def quantize_model(self, model: nn.Module) -> list[str]:
        model.to(self.dtype)
        return []
