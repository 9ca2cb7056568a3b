"""HF checkpoints store a mixture's experts one tensor each; the model holds them stacked, [experts, out, in].

An architecture's `map_hf_name` names expert E's tensor `NAME[E]`; these stack them into `NAME`, holding only
the experts of tensors not yet complete (a layer's experts usually lie next to each other in the file)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from artifacts.errors import MlccError
from compiler.weight_shapes import SourceShapes

EXPERT_NAME = re.compile(r"(.+)\[(\d+)\]")


def stack_experts(tensors: Iterator[tuple[str, np.ndarray]], num_experts: int) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) with every `NAME[E]` collected into one `NAME` of all `num_experts` experts."""
    pending: dict[str, dict[int, np.ndarray]] = {}
    for name, array in tensors:
        expert = EXPERT_NAME.fullmatch(name)
        if not expert:
            yield name, array
            continue
        stacked, index = expert.group(1), int(expert.group(2))
        if index >= num_experts:
            raise MlccError(f"tensor {stacked} has expert {index}, but the model config has {num_experts} experts")
        parts = pending.setdefault(stacked, {})
        parts[index] = array
        if len(parts) == num_experts:
            del pending[stacked]
            shapes = {parts[i].shape for i in range(num_experts)}
            if len(shapes) > 1:
                raise MlccError(f"the experts of {stacked} differ in shape: {sorted(shapes)}")
            yield stacked, np.stack([parts[i] for i in range(num_experts)])
    for stacked, parts in pending.items():
        raise MlccError(f"the checkpoint has {len(parts)} of the {num_experts} experts of {stacked}")


def stack_expert_shapes(shapes: SourceShapes) -> SourceShapes:
    """The shapes the stacked tensors will have: [experts found, *the first expert's shape]."""
    stacked: SourceShapes = {}
    counts: dict[str, int] = {}
    for name, (source_name, shape) in shapes.items():
        expert = EXPERT_NAME.fullmatch(name)
        if not expert:
            stacked[name] = (source_name, shape)
            continue
        base = expert.group(1)
        counts[base] = counts.get(base, 0) + 1
        stacked.setdefault(base, (source_name, tuple(shape)))
    return {
        name: (source, (counts[name], *shape) if name in counts else shape) for name, (source, shape) in stacked.items()
    }
