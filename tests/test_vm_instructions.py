"""compiler/vm_instructions.py: fewer VM instructions, the same results."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.script import relax as R
from tvm.script import tirx as T

from compiler.vm_instructions import slim_vm_calls

WIDTH = 48
LAYERS = 6


class Chain(nn.Module):
    """Matmuls that do not fuse, with reshapes between them, as a decode step's layers are."""

    def __init__(self):
        self.weights = nn.ModuleList([nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)])

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        for linear in self.weights:
            y = op.reshape(linear(x), (x.shape[0], 1, WIDTH))  # [b, 1, w]
            x = op.reshape(op.softmax(y, axis=-1), (x.shape[0], WIDTH))  # [b, w]
        return x


@tvm.script.ir_module
class Branches:
    """A shape first made inside an If's branches, and again after them."""

    @R.function
    def forward(x: R.Tensor(("n", 8), "float32"), flag: R.Tensor((), "bool")) -> R.Tensor(("n", 2, 4), "float32"):
        n = T.int64()
        if flag:
            y = R.reshape(x, (n, 2, 4))
        else:
            y = R.reshape(R.reshape(x, (n, 4, 2)), (n, 2, 4))
        z = R.reshape(R.reshape(y, (n, 8)), (n, 2, 4))
        return R.add(z, z)


def _build(mod: tvm.IRModule, slim: bool) -> tuple[relax.VirtualMachine, str]:
    target = tvm.target.Target("llvm")
    passes = (
        cpu_generic.legalize_passes(target)
        + cpu_generic.dataflow_lower_passes(target)
        + cpu_generic.finalize_passes(target)
        + ([slim_vm_calls] if slim else [])
    )

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(m: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(m)

    executable = tvm.compile(mod, target=target, relax_pipeline=pipeline)
    text = executable.as_text().split("@forward:")[1].split("\n@")[0]
    return relax.VirtualMachine(executable, tvm.cpu()), text


def test_each_shape_once_and_only_storages_released():
    mod, params = Chain().export_tvm({"forward": {"x": nn.spec.Tensor(["b", WIDTH], "float32")}})
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((3, WIDTH)).astype("float32")]
    args += [rng.standard_normal(p.shape).astype("float32") for _, p in params]
    outputs, texts = [], []
    for slim in (False, True):
        vm, text = _build(mod, slim)
        outputs.append(vm["forward"](*[tvm.runtime.tensor(a) for a in args]).numpy())
        texts.append(text)
    np.testing.assert_array_equal(outputs[1], outputs[0])
    plain, slim_text = texts
    assert plain.count("make_shape") >= 4 * LAYERS
    assert slim_text.count("make_shape") <= 4  # [b, w], [b, 1, w] and the storages' byte counts
    assert plain.count("null_value") > 3 * LAYERS
    assert slim_text.count("null_value") == slim_text.count("alloc_storage") <= 4  # not one per layer


def test_functions_with_branches_are_left_alone():
    plain, slim = (_build(Branches, slim)[1] for slim in (False, True))
    assert slim == plain
