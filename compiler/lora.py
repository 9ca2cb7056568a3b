"""LoRA adapters merged into the checkpoint before quantization: W + s * B @ A for every adapted module.

Adapters are read by artifacts/lora_formats.py. Merging works at the checkpoint's own tensor names, before an
architecture maps them, so fused projections (Phi-3's qkv_proj) merge like any other. A GGUF file's block-quantized
tensors are decoded, merged and stored back in their own block type (GGUFLoraMerge).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from artifacts.errors import MlccError
from artifacts.lora_formats import Adapter

Q = GGMLQuantizationType
FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16}  # GGUFSource hands these over as float32 arrays, even when raw


class LoraMerge:
    """Applies adapters to a checkpoint's tensors as they stream past, by the checkpoint's tensor names."""

    def __init__(self, adapters: list[Adapter], shapes: dict[str, tuple[int, ...]]):
        """`shapes`: the base checkpoint's tensor shapes; every adapted tensor must be there, shaped alike."""
        for adapter in adapters:
            for name in sorted(adapter.base_names()):
                if name not in shapes:
                    raise MlccError(f"{adapter.path}: adapts {name}, which the base model does not have")
            for name, (a, b, _) in adapter.factors.items():
                if (b.shape[0], a.shape[1]) != tuple(shapes[name]):
                    raise MlccError(
                        f"{adapter.path}: {name} is {list(shapes[name])} in the base model but the adapter's "
                        f"factors make {[b.shape[0], a.shape[1]]}"
                    )
            for name, value in adapter.replacements.items():
                if value.shape != tuple(shapes[name]):
                    raise MlccError(
                        f"{adapter.path}: saves {name} as {list(value.shape)} but the base model has "
                        f"{list(shapes[name])} (resized vocabularies are not supported)"
                    )
        self.adapters = adapters

    def __call__(self, name: str, array: np.ndarray) -> np.ndarray:
        """The tensor with every adapter's change, in float32 (untouched when none adapts it)."""
        touched = [ad for ad in self.adapters if name in ad.base_names()]
        if not touched:
            return array
        merged = np.array(array, dtype=np.float32)
        for adapter in touched:
            if name in adapter.replacements:  # blended by the user's scale: 1 replaces, 0 keeps the base
                saved = adapter.replacements[name]
                merged = saved.copy() if adapter.scale == 1 else merged + adapter.scale * (saved - merged)
            if name in adapter.factors:
                a, b, scale = adapter.factors[name]
                merged += scale * (b @ a)
            if name in adapter.bias_deltas:
                merged += adapter.bias_deltas[name]
        return merged


@cache
def can_quantize(qtype: GGMLQuantizationType) -> bool:
    """Whether the installed gguf-py can encode `qtype` (0.19: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; not the K-quants)."""
    try:
        quantize(np.zeros((1, GGML_QUANT_SIZES[qtype][0]), np.float32), qtype)
    except NotImplementedError:
        return False
    return True


class GGUFLoraMerge:
    """llama.cpp adapters merged into a GGUF file's raw tensors as they stream past (GGUFSource.tensors(raw=True)).

    As llama.cpp's export-lora: an adapted tensor is decoded to float32 and gets W + s * B @ A. It is then encoded
    again in its own block type, so the build keeps the file's kernels and size; a type gguf-py cannot encode
    (the K-quants) stays F32 instead, exact and no less accurate than its block type: the build runs float tensors
    in float32 whatever their file type, so F16 would round without saving memory. Tensors no adapter touches pass
    through as they are, undecoded.
    """

    def __init__(self, adapters: list[Adapter], shapes: dict[str, tuple[int, ...]], types: dict[str, Q]):
        """`shapes`, `types`: the base file's (GGUFSource.tensor_shapes, .tensor_types)."""
        self.merge = LoraMerge(adapters, shapes)  # refuses names and shapes that do not fit
        self.source_types = types
        self.adapted = set().union(*(adapter.base_names() for adapter in adapters))
        self.types = dict(types)  # each tensor's type as the build stores it
        for name in self.adapted:
            if types[name] not in FLOAT_TYPES and not can_quantize(types[name]):
                self.types[name] = Q.F32
        if "output.weight" not in shapes and "token_embd.weight" in types:  # a tied head reads the embedding
            self.types["output.weight"] = self.types["token_embd.weight"]

    def kept_float(self) -> list[str]:
        """Adapted tensors stored as F32 because their block type cannot be encoded, for the compile summary."""
        return sorted(name for name in self.adapted if self.types[name] != self.source_types[name])

    def __call__(self, tensors: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
        for name, data in tensors:
            if name not in self.adapted:
                yield name, data
                continue
            qtype = self.source_types[name]
            weight = data if qtype in FLOAT_TYPES else dequantize(data, qtype)  # [rows, cols] float32
            merged = self.merge(name, weight)
            yield name, quantize(merged, qtype) if self.types[name] not in FLOAT_TYPES else merged
