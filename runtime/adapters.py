"""LoRA adapters loaded into the adapter slots of an artifact built with `mlcc compile --lora-slots N`.

Each slotted linear holds `lora.a` [slots * rank, in] and `lora.b` [out, slots * rank] (see compiler/lora_slots.py).
Loading an adapter into slot k writes its A into rows k*rank.. of `a` and its scaled B into the same columns of
`b`; a lower rank leaves the rest zero. An artifact compiled from an HF folder takes PEFT adapters (matched by the
checkpoint's module names, which the manifest lists), one compiled from a GGUF file takes llama.cpp's GGUF
adapters (named like the GGUF file's tensors, as the model is). Requests then name the adapter, and sequences
with different adapters (or none) share a batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tvm

from artifacts.errors import MlccError
from artifacts.lora_formats import load_adapter, load_gguf_adapter


class AdapterSlots:
    """Adapter name -> slot, and the slot contents inside an artifact's parameter list."""

    def __init__(self, section: dict[str, Any] | None, param_names: list[str], params: list, device: Any):
        self.section = section or {}
        self.params, self.device = params, device
        self.index = {name: i for i, name in enumerate(param_names)}
        self.slots: dict[str, int] = {}
        # checkpoint module name (PEFT's, or the GGUF file's) -> the model's module path
        self.by_source = {info["source"]: path for path, info in self.section.get("modules", {}).items()}
        self.source_format = self.section.get("source_format", "hf")

    @property
    def capacity(self) -> int:
        return int(self.section.get("slots", 0))

    def slot(self, name: str | None) -> int:
        """The slot of adapter `name` (-1: the base model, for None)."""
        if name is None:
            return -1
        if name not in self.slots:
            known = ", ".join(self.slots) or "none loaded"
            raise MlccError(f"unknown adapter {name!r} (adapters: {known})")
        return self.slots[name]

    def load(self, name: str, path: str | Path, scale: float = 1.0) -> int:
        """Load the LoRA adapter at `path` (a PEFT folder, or a llama.cpp .gguf file) into the next free slot as
        `name`; returns the slot."""
        if not self.capacity:
            raise MlccError("this artifact has no adapter slots; compile it with --lora-slots N")
        if name in self.slots:
            raise MlccError(f"adapter {name!r} is loaded already")
        if len(self.slots) == self.capacity:
            raise MlccError(f"all {self.capacity} adapter slots are taken")
        gguf_file = str(path).endswith(".gguf")
        if gguf_file != (self.source_format == "gguf"):
            takes = "llama.cpp GGUF adapters" if self.source_format == "gguf" else "PEFT adapter folders"
            raise MlccError(
                f"{path}: this artifact was compiled from a {self.source_format.upper()} model and takes {takes}"
            )
        adapter = load_gguf_adapter(path, scale) if gguf_file else load_adapter(path, scale)
        slot, rank = len(self.slots), int(self.section["rank"])
        updates: dict[str, np.ndarray] = {}
        for tensor, (a, b, s) in adapter.factors.items():
            module = self.by_source.get(tensor.removesuffix(".weight"))
            if module is None:
                raise MlccError(f"{adapter.path}: adapts {tensor}, which has no adapter slot (block linears only)")
            if a.shape[0] > rank:
                raise MlccError(f"{adapter.path}: {tensor} has rank {a.shape[0]}; the slots hold up to {rank}")
            a_name, b_name = f"{module}.lora.a", f"{module}.lora.b"
            a_all = updates.get(a_name, self.params[self.index[a_name]].numpy())
            b_all = updates.get(b_name, self.params[self.index[b_name]].numpy())
            if a.shape[1] != a_all.shape[1] or b.shape[0] != b_all.shape[0]:
                raise MlccError(f"{adapter.path}: {tensor}'s factors do not fit the model's {module}")
            columns = slice(slot * rank, slot * rank + a.shape[0])
            a_all[columns] = a
            b_all[:, columns] = s * b
            updates[a_name], updates[b_name] = a_all, b_all
        unsupported = [*adapter.bias_deltas, *adapter.replacements]
        if unsupported:
            raise MlccError(
                f"{adapter.path}: changes {unsupported[0]} (saved modules and bias LoRA need merging: mlcc compile "
                "--lora)"
            )
        for param, value in updates.items():
            self.params[self.index[param]] = tvm.runtime.tensor(value, self.device)
        self.slots[name] = slot
        return slot
