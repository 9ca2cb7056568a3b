"""Sparse mixture-of-experts: a router picks `top_k` of `num_experts` SwiGLU experts per token.

The (token, slot) pairs are sorted by expert, each expert's rows multiplied as a group, and the pairs' outputs
summed back into their tokens with the router's weights (the kernels: tir_kernels/experts.py).
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from tir_kernels.experts import ExpertLinear, group_kernel, route_kernel


class Router(nn.Module):
    """Logits of every expert for each token, in float32 (a float weight in every scheme, as llama.cpp keeps it)."""

    def __init__(self, hidden: int, num_experts: int):
        self.weight = nn.Parameter((num_experts, hidden))

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.weight.dtype == "float32" else self.weight.astype("float32")
        return op.matmul(x, op.permute_dims(w))  # [n, E]


def sparse_moe(
    x: Tensor, router: Router, gate: ExpertLinear, up: ExpertLinear, down: ExpertLinear, act: nn.Module, top_k: int
) -> Tensor:
    """transformers' MixtralSparseMoeBlock of x [b, s, h]: down(act(gate(x), up(x))) of the top_k experts of each
    token, weighted by the router's renormalized probabilities."""
    b, s, h = x.shape
    num_experts = gate.num_experts
    rows = op.reshape(x, (b * s, h))
    rows = rows if rows.dtype == "float32" else rows.astype("float32")  # [n, h]
    n = rows.shape[0]
    weights, experts = op.tensor_ir_op(
        route_kernel(num_experts, top_k),
        "moe_route",
        [router(rows)],
        [Tensor.placeholder([n, top_k], "float32"), Tensor.placeholder([n, top_k], "int32")],
    )  # [n, k] each
    starts, order, position = op.tensor_ir_op(
        group_kernel(num_experts, top_k),
        "moe_group",
        [op.reshape(experts, (n * top_k,))],
        [
            Tensor.placeholder([num_experts + 1], "int32"),
            Tensor.placeholder([n * top_k], "int32"),
            Tensor.placeholder([n * top_k], "int32"),
        ],
    )
    hidden = act(gate(rows, starts, order, top_k), up(rows, starts, order, top_k))  # [n*k, i], sorted by expert
    out = op.tensor_expr_op(_combine, "moe_combine", [down(hidden, starts, order, 0), weights, position])  # [n, h]
    out = out if out.dtype == x.dtype else out.astype(x.dtype)
    return op.reshape(out, (b, s, h))


def _combine(down: te.Tensor, weights: te.Tensor, position: te.Tensor) -> te.Tensor:
    """out[t] = sum_j weights[t, j] * down[position[t*k + j]], slots in order (as transformers adds them)."""
    n, k = weights.shape
    hidden = down.shape[1]

    def value(t, c):
        total = tirx.const(0.0, "float32")
        for j in range(int(k)):
            total = total + weights[t, j] * down[position[t * k + j], c]
        return total

    return te.compute((n, hidden), value, name="moe_combine")
