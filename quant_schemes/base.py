"""The interface every quantization scheme implements.

A scheme (1) swaps the float modules of an nn model for its own (their `forward` dequantizes inside the
compiled kernel) and (2) converts float host tensors into the packed arrays those modules take as
parameters. The converter never sees more than one tensor at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from tvm.relax.frontend import nn
from tvm.target import Target

from tir_kernels.numerics import Numerics


class PackedModule(nn.Module):
    """A module whose parameters are a packed encoding of one float tensor (its `weight`)."""

    def pack_weight(self, weight: np.ndarray) -> dict[str, np.ndarray]:
        """Parameter suffix -> packed array, from the float weight in the source layout."""
        raise NotImplementedError


class QuantScheme(ABC):
    name: str
    description: str
    # Activation / float-parameter dtype of the compiled model.
    dtype: str
    # Whose order of float operations the build computes in; a scheme with a choice decides it in `prepare`.
    numerics: Numerics = Numerics.MLCC

    @abstractmethod
    def quantize_model(self, model: nn.Module) -> list[str]:
        """Replace modules in place; returns the names of tensors kept in float, for the summary."""

    def prepare(self, target: Target) -> None:  # noqa: B027 - most schemes have one kind of kernel
        """Pick kernels (and `numerics`) for the compilation target, before `quantize_model`."""

    def bits_per_weight(self) -> float:
        """Nominal storage per weight of a quantized matrix, scales included."""
        return float(np.dtype(self.dtype).itemsize * 8)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "bits_per_weight": self.bits_per_weight()}


def find_module(model: nn.Module, path: str) -> nn.Module:
    node: Any = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, nn.ModuleList) else getattr(node, part)
    return node


def convert_tensor(model: nn.Module, name: str, array: np.ndarray) -> dict[str, np.ndarray]:
    """Model parameters for one source tensor named after the model's own (GGUF-style) names."""
    module_path, param = name.rsplit(".", 1)
    module = find_module(model, module_path)
    if isinstance(module, PackedModule) and param == "weight":
        return {f"{module_path}.{k}": v for k, v in module.pack_weight(array).items()}
    target: nn.Parameter = getattr(module, param)
    if tuple(array.shape) != tuple(int(d) for d in target.shape):
        raise ValueError(f"{name}: shape {tuple(array.shape)} does not match the model's {tuple(target.shape)}")
    return {name: array.astype(target.dtype)}
