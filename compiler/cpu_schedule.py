"""A light CPU schedule for the kernels TVM's CPU pipeline leaves unscheduled.

Matmuls: unscheduled, TVM emits them as serial loop nests with the token loop outermost and the weight
decoded again for every token. Here the output-row loop goes outermost and runs in parallel, each weight row
is decoded once into a local buffer and reused by every token, and the accumulator is zeroed outside the
reduction so LLVM can vectorize the dot product.

Everything else (norms, activations, RoPE, residual adds): legalized, a fused kernel is one serial loop nest
per operator with a full-size buffer between each, e.g. ten passes over memory for GeLU-tanh times up.
Here each intermediate of the output's shape is computed inline where it is used, the remaining loop nests
run their outer loops in parallel and vectorize the inner one.

Kernels that come scheduled (the KV cache's attention, the hand-written GGUF matmuls) are left alone.
"""

from __future__ import annotations

from math import prod

import tvm
import tvm_ffi
from tvm import relax, s_tir, te, tirx, topi

MATMUL_BLOCKS = ("q_matmul", "gguf_matmul", "matmul")
VECTOR_LANES = 8  # float32 lanes of an AVX2 register
MIN_PARALLEL = 64  # fewer rows than this (of a fixed count) are not worth a parallel launch


def _schedule(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    if not _has_root(sch):
        return func
    changed = False
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
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
    return sch.mod["main"] if changed else _schedule_loops(func)


def _schedule_loops(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Inline intermediates of the output's shape; parallel outer loops and vector inner loops for the rest."""
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    plain = [sch.get(b) for b in blocks]
    nested = [len(sch.get_loops(block)) == len(stmt.iter_vars) for block, stmt in zip(blocks, plain)]
    if not blocks or not all(nested) or any(len(stmt.writes) != 1 for stmt in plain):
        return func  # not a plain legalized loop nest per operator
    output = _shape(plain[-1].writes[0])
    for block, stmt in zip(blocks[:-1], plain[:-1]):
        spatial = all(v.iter_type == tirx.IterVar.DataPar for v in stmt.iter_vars)
        if spatial and _same_shape(_shape(stmt.writes[0]), output):
            try:
                sch.compute_inline(block)
            except s_tir.ScheduleError:  # e.g. read by a block at other indices: keep it as its own loop nest
                continue
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        iters = sch.get(block).iter_vars
        loops = sch.get_loops(block)
        leading = next((i for i, v in enumerate(iters) if v.iter_type != tirx.IterVar.DataPar), len(iters))
        if leading == 0:
            continue
        inner = loops[leading - 1]
        if leading == len(iters) and (_extent(sch, inner) or 1) % VECTOR_LANES == 0:
            _, lanes = sch.split(inner, factors=[None, VECTOR_LANES])
            sch.vectorize(lanes)
            outer = loops[: leading - 1]
        elif leading < len(iters):  # a reduction: rows in parallel
            outer = loops[:leading]
        else:
            outer = loops[: max(leading - 1, 1)]
        extents = [_extent(sch, loop) for loop in outer]
        if outer and (None in extents or prod(extents) >= MIN_PARALLEL):
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    return sch.mod["main"]


def _shape(region) -> list:
    return list(region.source.shape)


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(tvm_ffi.structural_equal(x, y) for x, y in zip(a, b))


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
            except s_tir.ScheduleError:  # a kernel the simple schedule does not fit stays as it was
                continue
    return mod


def _gelu_tanh(x: te.Tensor) -> te.Tensor:
    """GeLU with the tanh approximation, tanh as a rational function that vectorizes (libm's is scalar)."""
    inner = x * (0.7978845608028654 + 0.035677408136300125 * x * x)  # sqrt(2/pi) * (x + 0.044715 x^3)
    return 0.5 * x * (1.0 + topi.fast_tanh(inner))


@relax.expr_functor.mutator
class _FastGelu(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.gelu_tanh":
            return self.builder_.call_te(_gelu_tanh, call.args[0], primfunc_name_hint="gelu_tanh")
        return call


@tvm.transform.module_pass(opt_level=0, name="MlccFastGelu")
def fast_gelu(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """GeLU-tanh with a vectorizable tanh (max relative error ~1e-6 against libm's)."""
    mutator = _FastGelu(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
