"""Relax IRModule -> device library, per target."""

from __future__ import annotations

from pathlib import Path

import tvm
from tvm import relax

from compiler.targets import TargetSpec


def build_library(mod: tvm.IRModule, spec: TargetSpec, out: Path) -> None:
    """Lower with the target's fusing pipeline and export a loadable library to `out`."""
    pipeline = relax.get_default_pipeline(spec.target)
    executable = tvm.compile(mod, target=spec.target, relax_pipeline=pipeline)
    executable.export_library(str(out))
