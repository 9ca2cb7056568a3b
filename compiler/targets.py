"""Compilation targets. Each names a TVM target, the runtime device and how the library is exported."""

from __future__ import annotations

from dataclasses import dataclass

from tvm.target import Target

from artifacts.errors import MlccError


@dataclass
class TargetSpec:
    name: str
    target: Target
    device: str  # the runtime's device kind: "cpu", "cuda", ...
    library_name: str

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "device": self.device, "tvm_target": str(self.target)}


def _llvm() -> TargetSpec:
    """The host CPU, with its own instruction set (AVX2, F16C, ...) so LLVM can use it."""
    from tvm.target import codegen

    target = Target(
        {
            "kind": "llvm",
            "mcpu": codegen.llvm_get_system_cpu(),
            # Reassociation lets LLVM vectorize the dot products, as llama.cpp's SIMD sums do.
            "fast-math-reassoc": True,
            "fast-math-contract": True,
        }
    )
    return TargetSpec("llvm", target, "cpu", "model.so")


TARGETS = {"llvm": _llvm}


def resolve_target(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise MlccError(f"unsupported target {name!r}; supported today: {', '.join(TARGETS)}")
    return TARGETS[name]()
