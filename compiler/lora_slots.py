"""Adapter slots: one library serves several LoRA adapters over the same base weights, each sequence picking
its own (vLLM's multi-LoRA), or mixing them per token (X-LoRA), without merging them in.

Every linear of the blocks gets two float parameters stacked over the slots, `lora.a` [slots * rank, in] and
`lora.b` [out, slots * rank], and computes

    y = base(x) + ((x @ a^T) * scale) @ b^T

where `scale` [tokens, slots * rank] repeats, over each slot's `rank` columns, the token's scaling of that slot in
this module. The scalings come in as a small table, `lora_scalings` [rows, modules, slots], and each token's row of
it, `scaling_rows` [tokens]: a plain adapter request's tokens share a one-hot row (the base model's an all-zero
one), while an X-LoRA request's tokens each get their own row, its classifier's output (runtime/xlora.py). Module
m is the m-th of the manifest's `module_order`. The adapter's scale (alpha / r) is folded into `b` when it is
loaded, and lower ranks are padded with zeros. The artifact ships no adapter: the runtime starts every slot at zero
and loads PEFT adapters into them (runtime/adapters.py), reading the module names, shapes and order from the
manifest's `lora_slots` section this module writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from artifacts.errors import MlccError
from quant_schemes.base import find_module

MAX_SLOTS = 64
MAX_RANK = 256


@dataclass
class SlotScalings:
    """The scalings of the call being traced, shared by every slotted linear (the entry points set them from
    their `scaling_rows` and `lora_scalings` inputs before running the model)."""

    slots: int
    rank: int
    modules: int
    rows: Tensor | None = None  # [tokens] int32: each token's row of `table`
    table: Tensor | None = None  # [rows, modules, slots] float32

    def set_inputs(self, scaling_rows: Tensor, lora_scalings: Tensor) -> None:
        self.rows, self.table = scaling_rows, lora_scalings

    def apply(self, xa: Tensor, module: int) -> Tensor:
        """`xa` [b, s, slots * rank] with each slot's columns times the token's scaling of it in `module`."""
        if self.rows is None or self.table is None:
            raise RuntimeError("the entry point did not set the adapter scalings of this call")
        rank = self.rank

        def compute(xa: te.Tensor, rows: te.Tensor, table: te.Tensor) -> te.Tensor:
            seq = xa.shape[1]
            return te.compute(
                xa.shape,
                lambda i, j, c: xa[i, j, c] * table[rows[i * seq + j], module, c // rank].astype(xa.dtype),
                name="lora_slot_scale",
            )

        return op.tensor_expr_op(compute, "lora_slot_scale", [xa, self.rows, self.table])


class LoraDelta(nn.Module):
    """The low-rank change of one linear (the `module`-th slotted one), with each token's scalings of the slots."""

    def __init__(self, in_features: int, out_features: int, module: int, slots: SlotScalings, dtype: str):
        self.a = nn.Parameter((slots.slots * slots.rank, in_features), dtype)
        self.b = nn.Parameter((out_features, slots.slots * slots.rank), dtype)
        self.module, self.slots = module, slots

    def forward(self, x: Tensor) -> Tensor:
        xa = op.matmul(x.astype(self.a.dtype), op.permute_dims(self.a))  # [b, s, slots*rank]
        xa = self.slots.apply(xa, self.module)  # the token's share of each slot
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
) -> SlotScalings:
    """Give each of `linears` (from `block_linears`, after quantization; module m is the m-th of them) a LoraDelta
    added to its output; the model's `lora_slots` attribute is the shared scalings the entry points fill."""
    scalings = SlotScalings(slots, rank, len(linears))
    for index, (path, (in_features, out_features)) in enumerate(linears.items()):
        module = find_module(model, path)
        delta = LoraDelta(in_features, out_features, index, scalings, dtype)
        base_forward = module.forward
        module.lora = delta
        module.forward = lambda x, base_forward=base_forward, delta=delta: base_forward(x) + delta(x)
    model.lora_slots = scalings
    return scalings


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
    llama.cpp's), per slotted module its shape and the base checkpoint's name for it (`source_names`: model
    path -> checkpoint module name; GGUF names map to themselves), so adapters are placed without the compiler,
    and the modules' order (`lora_scalings`' module axis; it is the checkpoint's module order, as model_defs
    declare the linears of a block in it, which X-LoRA's layerwise scalings follow)."""
    return {
        "slots": slots,
        "rank": rank,
        "dtype": dtype,
        "source_format": source_format,
        "module_order": list(linears),
        "modules": {
            path: {"in": i, "out": o, "source": source_names.get(path, path)} for path, (i, o) in linears.items()
        },
    }
