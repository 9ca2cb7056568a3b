"""LoRA adapters merged into a float checkpoint before quantization: W + s * B @ A for every adapted module.

Adapters are read by artifacts/lora_formats.py. Merging works at the checkpoint's own tensor names, before an
architecture maps them, so fused projections (Phi-3's qkv_proj) merge like any other.
"""

from __future__ import annotations

import numpy as np

from artifacts.errors import MlccError
from artifacts.lora_formats import Adapter


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
