"""Fewer Relax VM instructions per call: what the VM executes between the kernels of a decode step.

The VM runs each builtin as a packed call, ~100 ns apiece: a 30-layer SmolLM2 decode step made 3,119 of them,
of which 977 released tensors after their last use and 704 built the same few shapes again. After TVM's
lowering (`VMShapeLower`), `slim_vm_calls` builds each shape once per call (a shape reads slots of the shape
heap, each written once, before its first read) and drops the releases of tensors. Every tensor a function
does not return is a view into storage that `StaticPlanBlockMemory` planned, a few blocks each call allocates
once and reuses for tensors of the same size (10 in SmolLM2's decode step): releasing a view early frees
nothing the call could reuse, and the pool allocator gets the storage back when the call returns.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

_ALLOC_STORAGE = tvm.ir.Op.get("relax.vm.alloc_storage")
_RELEASE = tvm.ir.Op.get("relax.vm.kill_object")
_MAKE_SHAPE = "vm.builtin.make_shape"


def _is_shape(expr: relax.Expr) -> bool:
    return (
        isinstance(expr, relax.Call)
        and isinstance(expr.op, relax.ExternFunc)
        and str(expr.op.global_symbol) == _MAKE_SHAPE
    )


@mutator
class _SlimCalls(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.storages: list[relax.Var] = []  # released as before
        self.shapes: list[tuple[relax.Call, relax.Var]] = []  # first make_shape of each shape

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if isinstance(value, relax.Call) and value.op.same_as(_RELEASE):
            if not any(value.args[0].same_as(s) for s in self.storages):
                return
        elif isinstance(value, relax.Call) and value.op.same_as(_ALLOC_STORAGE):
            self.storages.append(binding.var)
        elif _is_shape(value):
            value = self.visit_expr(value)
            for made, var in self.shapes:
                if tvm_ffi.structural_equal(made, value):
                    self.set_var_remap(binding.var, var)
                    return
            var = self.builder_.emit(value)
            self.set_var_remap(binding.var, var)
            self.shapes.append((value, var))
            return
        super().visit_var_binding_(binding)


def _has_branches(func: relax.Function) -> bool:
    found: list[relax.If] = []
    relax.analysis.post_order_visit(func.body, lambda e: found.append(e) if isinstance(e, relax.If) else None)
    return bool(found)


@tvm.transform.module_pass(opt_level=0, name="MlccSlimVMCalls")
def slim_vm_calls(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Each shape built once per call, no releases of tensors (after `VMShapeLower`). Functions with If
    branches are left as they are: a shape first made in a branch does not dominate what follows (and TVM 0.27's
    planner lets a branch allocate storage the other branch and what follows use); no model has them."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function) and not _has_branches(func):
            mod[gv] = _SlimCalls(mod).visit_expr(func)
    return mod
