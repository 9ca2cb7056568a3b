"""A light CPU schedule for the weight-streaming kernels (quantized and float matmuls).

Unscheduled, TVM emits them as serial loop nests with the token loop outermost and the weight decoded
again for every token. Here the output-row loop goes outermost and runs in parallel, each weight row is
decoded once into a local buffer and reused by every token, and the accumulator is zeroed outside the
reduction so LLVM can vectorize the dot product. Kernels that come scheduled (the KV cache's attention) are
left alone.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

MATMUL_BLOCKS = ("q_matmul", "gguf_matmul", "matmul")


def _schedule(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    changed = False
    blocks = sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []
    dequant = [b for b in blocks if sch.get(b).name_hint.endswith("_dequant")]
    for block in blocks:
        name = sch.get(block).name_hint
        if not any(key in name for key in MATMUL_BLOCKS):
            continue
        iters = sch.get(block).iter_vars
        spatial = [i for i, v in enumerate(iters) if v.iter_type == tirx.IterVar.DataPar]
        loops = sch.get_loops(block)
        if len(loops) != len(iters) or not spatial or spatial != list(range(len(spatial))):
            continue
        out_loop = loops[spatial[-1]]
        if len(spatial) > 1:
            sch.reorder(out_loop, *[loops[i] for i in spatial[:-1]])
        sch.parallel(out_loop)
        for stage in dequant:  # decode just the weight row this iteration needs, SIMD over the innermost loop
            sch.compute_at(stage, out_loop)
            inner = sch.get_loops(stage)[-1]
            if _extent(sch, inner) in (8, 16, 32):
                sch.vectorize(inner)
        if len(loops) > len(spatial):
            # Zero the accumulator before the reduction loops, not inside them, so LLVM keeps it in a
            # register and vectorizes the inner loop.
            sch.decompose_reduction(block, loops[len(spatial)])
        changed = True
    return sch.mod["main"] if changed else func


def _extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # functions without a root block (hand-written kernels) are not ours to touch
        return False


@tvm.transform.module_pass(opt_level=0, name="MlccCPUSchedule")
def cpu_schedule(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc) and not gv.name_hint.startswith(("tir_", "kv_cache", "batch_")):
            try:
                mod[gv] = _schedule(func)
            except tvm.TVMError:  # a kernel the simple schedule does not fit stays as it was
                continue
    return mod
