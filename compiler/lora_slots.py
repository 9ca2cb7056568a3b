"""Adapter slots: one library serves several LoRA adapters over the same base weights, each sequence picking
its own (vLLM's multi-LoRA), without merging them in.

Every linear of the blocks gets two float parameters stacked over the slots, `lora.a` [slots * rank, in] and
`lora.b` [out, slots * rank], and computes

    y = base(x) + ((x @ a^T) * mask) @ b^T

where `mask` keeps the `rank` columns of each token's slot (none for slot -1, the base model). The adapter's
scale (alpha / r) is folded into `b` when it is loaded, and lower ranks are padded with zeros. The artifact
ships no adapter: the runtime starts every slot at zero and loads PEFT adapters into them (runtime/adapters.py),
reading the module names and shapes from the manifest's `lora_slots` section this module writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from artifacts.errors import MlccError
from quant_schemes.base import find_module

MAX_SLOTS = 64
MAX_RANK = 256


@dataclass
class SlotMask:
    """The mask [tokens, slots * rank] of the call being traced, shared by every slotted linear (the entry
    points set it from their `adapter_ids` input before running the model)."""

    slots: int
    rank: int
    dtype: str
    mask: Tensor | None = None

    def set_ids(self, adapter_ids: Tensor) -> None:
        """`adapter_ids` [tokens] int32: each token's slot, -1 for none."""
        rank = self.rank

        def compute(ids: te.Tensor) -> te.Tensor:
            return te.compute(
                (ids.shape[0], self.slots * rank),
                lambda t, c: tirx.if_then_else(c // rank == ids[t], 1.0, 0.0).astype(self.dtype),
                name="lora_slot_mask",
            )

        self.mask = op.tensor_expr_op(compute, "lora_slot_mask", [adapter_ids])


class LoraDelta(nn.Module):
    """The low-rank change of one linear, for the adapter in each token's slot."""

    def __init__(self, in_features: int, out_features: int, slots: SlotMask):
        self.a = nn.Parameter((slots.slots * slots.rank, in_features), slots.dtype)
        self.b = nn.Parameter((out_features, slots.slots * slots.rank), slots.dtype)
        self.slots = slots

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        if self.slots.mask is None:
            raise RuntimeError("the entry point did not set the adapter slots of this call")
        columns = self.slots.slots * self.slots.rank
        xa = op.matmul(x.astype(self.a.dtype), op.permute_dims(self.a))  # [b, s, slots*rank]
        xa = xa * op.reshape(self.slots.mask, (b, s, columns))  # only the token's slot
        return op.matmul(xa, op.permute_dims(self.b)).astype(x.dtype)  # [b, s, out]


def block_linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) of every nn.Linear in the model's blocks (`blk.N.`): what adapters may target.
    Read before quantization replaces them."""
    found: dict[str, tuple[int, int]] = {}

    def walk(module: Any, path: str) -> None:
        if isinstance(module, nn.Linear):
            if path.startswith("blk."):
                found[path] = (int(module.in_features), int(module.out_features))
            return
        items = enumerate(module) if isinstance(module, nn.ModuleList) else vars(module).items()
        for name, child in items:
            if isinstance(child, nn.Module | nn.ModuleList):
                walk(child, f"{path}.{name}" if path else str(name))

    walk(model, "")
    return found


def check_slots(linears: dict[str, tuple[int, int]], slots: int, rank: int) -> None:
    """One-line errors for slot settings that cannot build (slots 0: none asked for)."""
    if not slots:
        return
    if not 1 <= slots <= MAX_SLOTS or not 1 <= rank <= MAX_RANK:
        raise MlccError(f"--lora-slots must be in 1..{MAX_SLOTS} and --lora-rank in 1..{MAX_RANK}")
    if not linears:
        raise MlccError("this model has no linear layers in its blocks for adapter slots")


def add_lora_slots(
    model: nn.Module, linears: dict[str, tuple[int, int]], slots: int, rank: int, dtype: str
) -> SlotMask:
    """Give each of `linears` (from `block_linears`, after quantization) a LoraDelta added to its output; the
    model's `lora_slots` attribute is the shared mask the entry points fill."""
    mask = SlotMask(slots, rank, dtype)
    for path, (in_features, out_features) in linears.items():
        module = find_module(model, path)
        delta = LoraDelta(in_features, out_features, mask)
        base_forward = module.forward
        module.lora = delta
        module.forward = lambda x, base_forward=base_forward, delta=delta: base_forward(x) + delta(x)
    model.lora_slots = mask
    return mask


def lora_param_names(linears: dict[str, tuple[int, int]]) -> set[str]:
    return {f"{path}.lora.{part}" for path in linears for part in ("a", "b")}


def source_modules(shapes: dict[str, tuple[str, Any]]) -> dict[str, str]:
    """Model module path -> the checkpoint's module name, from compile's (model name -> (source name, shape))."""
    return {
        name.removesuffix(".weight"): source.removesuffix(".weight")
        for name, (source, _) in shapes.items()
        if name.endswith(".weight")
    }


def manifest_section(
    linears: dict[str, tuple[int, int]],
    source_names: dict[str, str],
    slots: int,
    rank: int,
    dtype: str,
    source_format: str,
) -> dict[str, Any]:
    """What the runtime needs to load adapters: slots, rank, dtype, the base's format ("hf": PEFT adapters, "gguf":
    llama.cpp's), and per slotted module its shape and the base checkpoint's name for it (`source_names`: model
    path -> checkpoint module name; GGUF names map to themselves), so adapters are placed without the compiler."""
    return {
        "slots": slots,
        "rank": rank,
        "dtype": dtype,
        "source_format": source_format,
        "modules": {
            path: {"in": i, "out": o, "source": source_names.get(path, path)} for path, (i, o) in linears.items()
        },
    }
