"""Relax IRModule -> device library, per target."""

from __future__ import annotations

from pathlib import Path

import tvm
from tvm import relax

from compiler.cpu_schedule import cpu_schedule
from compiler.targets import TargetSpec


def _cpu_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CPU pipeline with mlcc's matmul schedule inserted after fusion."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    passes = (
        cpu_generic.library_dispatch_passes(target)
        + cpu_generic.legalize_passes(target)
        + [cpu_schedule]
        + cpu_generic.dataflow_lower_passes(target)
        + cpu_generic.finalize_passes(target)
    )

    @tvm.transform.module_pass(opt_level=0, name="MlccCPUPipeline")
    def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def build_library(mod: tvm.IRModule, spec: TargetSpec, out: Path) -> None:
    """Lower with the target's fusing pipeline and export a loadable library to `out`."""
    if spec.device == "cpu":
        pipeline = _cpu_pipeline(spec.target)
    else:
        pipeline = relax.get_default_pipeline(spec.target)
    executable = tvm.compile(mod, target=spec.target, relax_pipeline=pipeline)
    executable.export_library(str(out))
