"""LoRA adapters loaded into the adapter slots of an artifact built with `mlcc compile --lora-slots N`.

Each slotted linear holds `lora.a` [slots * rank, in] and `lora.b` [out, slots * rank] (see compiler/lora_slots.py).
Loading an adapter into slot k writes its A into rows k*rank.. of `a` and its scaled B into the same columns of
`b`; a lower rank leaves the rest zero. An artifact compiled from an HF folder takes PEFT adapters (matched by the
checkpoint's module names, which the manifest lists), one compiled from a GGUF file takes llama.cpp's GGUF
adapters (named like the GGUF file's tensors, as the model is). Requests then name the adapter, and sequences
with different adapters (or none) share a batch.

Every call of the library takes each token's scalings of the slots per module (compiler/lora_slots.py): a table
`lora_scalings` [rows, modules, slots] and each token's row of it. A plain adapter's tokens share a one-hot row,
the base model's an all-zero one; an X-LoRA model (runtime/xlora.py, its experts loaded into slots like adapters)
gives each token its own row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tvm

from artifacts.errors import MlccError
from artifacts.lora_formats import Adapter, load_adapter, load_gguf_adapter
from runtime.xlora import XLora, check_classifier_width, expert_factors, is_xlora_folder, read_xlora

# What a sequence adds to one call: an adapter slot (-1: none) shared by its tokens, or each token's row
# [tokens, modules, slots] (X-LoRA).
Mix = int | np.ndarray


class AdapterSlots:
    """Adapter name -> slot, and the slot contents inside an artifact's parameter list."""

    def __init__(
        self,
        section: dict[str, Any] | None,
        param_names: list[str],
        params: list,
        device: Any,
        model_config: dict[str, Any] | None = None,
    ):
        self.section = section or {}
        self.model_config = model_config or {}  # hidden size and layers, for X-LoRA models
        self.params, self.device = params, device
        self.index = {name: i for i, name in enumerate(param_names)}
        self.slots: dict[str, int] = {}
        self.xloras: dict[str, XLora] = {}
        self.order = list(self.section.get("module_order", []))
        self.taken = 0  # slots in use (an X-LoRA model's experts take one each)
        # checkpoint module name (PEFT's, or the GGUF file's) -> the model's module path
        self.by_source = {info["source"]: path for path, info in self.section.get("modules", {}).items()}
        self.source_format = self.section.get("source_format", "hf")

    @property
    def capacity(self) -> int:
        return int(self.section.get("slots", 0))

    @property
    def table_shape(self) -> tuple[int, int]:
        """(modules, slots): a row of the `lora_scalings` input."""
        return len(self.order), self.capacity

    @property
    def names(self) -> list[str]:
        return [*self.slots, *self.xloras]

    def slot(self, name: str | None) -> int:
        """The slot of adapter `name` (-1: the base model, for None)."""
        if name is None:
            return -1
        if name not in self.slots:
            known = ", ".join(self.names) or "none loaded"
            raise MlccError(f"unknown adapter {name!r} (adapters: {known})")
        return self.slots[name]

    def xlora(self, name: str | None) -> XLora | None:
        """The X-LoRA model loaded as `name`, or None (a plain adapter's name, or the base model's)."""
        return self.xloras.get(name) if name is not None else None

    def load(self, name: str, path: str | Path, scale: float = 1.0) -> int:
        """Load the LoRA adapter at `path` (a PEFT folder, or a llama.cpp .gguf file) into the next free slot as
        `name`; returns the slot. An X-LoRA folder loads its experts into as many slots (returns the first)."""
        if not self.capacity:
            raise MlccError("this artifact has no adapter slots; compile it with --lora-slots N")
        if name in self.slots or name in self.xloras:
            raise MlccError(f"adapter {name!r} is loaded already")
        if is_xlora_folder(path):
            return self._load_xlora(name, path, scale)
        if self.taken == self.capacity:
            raise MlccError(f"all {self.capacity} adapter slots are taken")
        gguf_file = str(path).endswith(".gguf")
        if gguf_file != (self.source_format == "gguf"):
            takes = "llama.cpp GGUF adapters" if self.source_format == "gguf" else "PEFT adapter folders"
            raise MlccError(
                f"{path}: this artifact was compiled from a {self.source_format.upper()} model and takes {takes}"
            )
        adapter = load_gguf_adapter(path, scale) if gguf_file else load_adapter(path, scale)
        updates = self._place(adapter, self.taken, {})
        self._commit(updates, 1)
        self.slots[name] = self.taken - 1
        return self.slots[name]

    def _load_xlora(self, name: str, path: str | Path, scale: float) -> int:
        """Load an X-LoRA model's experts into consecutive free slots (`scale` multiplies each one's alpha / r), and
        map PEFT's module order (the adapted modules, in the checkpoint's order) onto the artifact's."""
        if self.source_format != "hf":
            raise MlccError(f"{path}: X-LoRA models need an artifact compiled from a Hugging Face model")
        xlora = read_xlora(path, int(self.model_config.get("hidden_size", 0)))
        if self.taken + xlora.classes > self.capacity:
            free = self.capacity - self.taken
            raise MlccError(f"{path}: its {xlora.classes} experts need as many adapter slots; {free} are free")
        updates: dict[str, np.ndarray] = {}
        adapted: set[str] = set()
        for i, expert in enumerate(xlora.experts):
            adapter = expert_factors(load_adapter(expert, scale), int(self.model_config.get("num_layers", 0)))
            updates = self._place(adapter, self.taken + i, updates)
            adapted |= {self.by_source[t.removesuffix(".weight")] for t in adapter.factors}
        xlora.slots = list(range(self.taken, self.taken + xlora.classes))
        xlora.modules = [m for m, module in enumerate(self.order) if module in adapted]
        check_classifier_width(xlora)
        self._commit(updates, xlora.classes)
        self.xloras[name] = xlora
        return xlora.slots[0]

    def _place(self, adapter: Adapter, slot: int, updates: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`updates` (parameter -> new value) with `adapter`'s factors in `slot`; nothing is changed yet."""
        rank = int(self.section["rank"])
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
        return updates

    def _commit(self, updates: dict[str, np.ndarray], slots: int) -> None:
        for param, value in updates.items():
            self.params[self.index[param]] = tvm.runtime.tensor(value, self.device)
        self.taken += slots

    def call_inputs(self, mixes: list[Mix], lengths: list[int]) -> list[np.ndarray]:
        """The library's `scaling_rows` [tokens] and `lora_scalings` [rows, modules, slots] for a call whose i-th
        sequence adds `lengths[i]` tokens with `mixes[i]`."""
        modules, slots = self.table_shape
        table: list[np.ndarray] = [np.zeros((1, modules, slots), np.float32)]  # row 0: no adapter
        shared = {-1: 0}
        rows, size = [], 1
        for mix, n in zip(mixes, lengths):
            if isinstance(mix, np.ndarray):  # one row per token
                table.append(mix.astype(np.float32))
                rows.append(np.arange(size, size + n))
                size += n
                continue
            if mix not in shared:
                one_hot = np.zeros((1, modules, slots), np.float32)
                one_hot[0, :, mix] = 1
                shared[mix], size = size, size + 1
                table.append(one_hot)
            rows.append(np.full(n, shared[mix]))
        return [np.concatenate(rows).astype("int32"), np.concatenate(table)]
