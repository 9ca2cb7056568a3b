"""The kernels of a sparse mixture-of-experts layer (model_defs/moe.py): routing, grouping and grouped matmuls.

The expert matmuls are grouped, not a loop over experts: the (token, slot) pairs are sorted by expert
(`moe_group`), each expert's weight rows are read once for all the pairs routed to it and for none when no pair
is (`grouped_matmul`: decode reads only the chosen experts' weights), and the pairs' outputs are summed back
into their tokens with the router's weights (`combine`). An expert tensor holds all experts, [experts, out, in]
(llama.cpp's `ffn_*_exps`); a quantization scheme swaps `ExpertLinear` for its own packed module, which gives
`grouped_matmul` a decoder of one weight element (weights decoded to float32), or, for GGUF blocks on a CPU
with 8-bit-activation kernels, runs a dense layer's kernel body per expert (`grouped_rows_kernel`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T

from tir_kernels.row_matmul import RowMatmul
from tir_kernels.simd import LANES, task_share  # LANES: float32 lanes of the dot products' accumulators

# Weight rows are split into this many contiguous ranges, run in parallel (each with its own decoded row).
TASKS = 64
TOKENS = 4  # rows of one expert multiplied together in prefill, sharing each load of the decoded weights

# (params, expert, row, run j, i, dtype) -> the weight element at column j * run + i, as `dtype`.
WeightAt = Callable[..., Any]


def route_kernel(num_experts: int, top_k: int) -> tirx.PrimFunc:
    """Router logits [n, E] -> weights [n, k] and experts [n, k], as transformers' MixtralTopKRouter: softmax over
    all experts in float32, the top k probabilities (the first expert wins a tie), renormalized to sum to 1."""

    @T.prim_func(private=True, s_tir=True)
    def route(var_logits: T.handle, var_weights: T.handle, var_experts: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        logits = T.match_buffer(var_logits, (n, num_experts), "float32")
        weights = T.match_buffer(var_weights, (n, top_k), "float32")
        experts = T.match_buffer(var_experts, (n, top_k), "int32")
        with T.sblock("root"):
            prob = T.alloc_buffer((n, num_experts), "float32")
            taken = T.alloc_buffer((n, num_experts), "int32")
            acc = T.alloc_buffer((n, 2), "float32")  # the logits' maximum, then sums
            best = T.alloc_buffer((n,), "int32")
            for t in T.parallel(n):
                acc[t, 0] = logits[t, 0]
                for e in range(num_experts):
                    acc[t, 0] = T.max(acc[t, 0], logits[t, e])
                acc[t, 1] = T.float32(0)
                for e in range(num_experts):
                    prob[t, e] = T.exp(logits[t, e] - acc[t, 0])
                    acc[t, 1] = acc[t, 1] + prob[t, e]
                    taken[t, e] = 0
                for e in range(num_experts):
                    prob[t, e] = prob[t, e] / acc[t, 1]
                acc[t, 1] = T.float32(0)
                for j in range(top_k):
                    best[t] = -1
                    for e in range(num_experts):
                        if taken[t, e] == 0:
                            if best[t] < 0:
                                best[t] = e
                            elif prob[t, e] > prob[t, best[t]]:
                                best[t] = e
                    taken[t, best[t]] = 1
                    experts[t, j] = best[t]
                    weights[t, j] = prob[t, best[t]]
                    acc[t, 1] = acc[t, 1] + prob[t, best[t]]
                for j in range(top_k):
                    weights[t, j] = weights[t, j] / acc[t, 1]

    return route


def group_kernel(num_experts: int, top_k: int) -> tirx.PrimFunc:
    """Experts [n, k] -> `starts` [E + 1] (expert e's pairs are rows starts[e] .. starts[e+1] of the sorted order),
    `order` [n*k] (sorted row -> pair t*k + j, tokens in order within an expert) and `position` (its inverse)."""

    @T.prim_func(private=True, s_tir=True)
    def group(var_experts: T.handle, starts: T.Buffer((num_experts + 1,), "int32"), var_order: T.handle,
              var_position: T.handle):  # fmt: skip
        T.func_attr({"tirx.noalias": True})
        pairs = T.int64()
        experts = T.match_buffer(var_experts, (pairs,), "int32")
        order = T.match_buffer(var_order, (pairs,), "int32")
        position = T.match_buffer(var_position, (pairs,), "int32")
        with T.sblock("root"):
            cursor = T.alloc_buffer((num_experts,), "int32")
            for e in range(num_experts + 1):
                starts[e] = 0
            for p in range(pairs):
                starts[experts[p] + 1] = starts[experts[p] + 1] + 1
            for e in range(num_experts):
                starts[e + 1] = starts[e + 1] + starts[e]
                cursor[e] = starts[e]
            for p in range(pairs):
                order[cursor[experts[p]]] = T.Cast("int32", p)
                position[p] = cursor[experts[p]]
                cursor[experts[p]] = cursor[experts[p]] + 1

    return group


def grouped_matmul_kernel(
    num_experts: int,
    n_in: int,
    n_out: int,
    param_specs: Sequence[tuple[tuple[int, ...], str]],
    weight_at: WeightAt,
    run: int,
    gather_k: int,
) -> tirx.PrimFunc:
    """y[r] = W[e] @ x_r for every sorted pair row r of expert e, in float32.

    x_r is x[order[r] // gather_k] (the pair's token) when gather_k > 0, else x[r] (rows already sorted). Each
    task decodes one weight row of an expert into a float32 buffer once, `run` contiguous columns per (vector)
    inner loop, then multiplies it with every row routed to that expert; experts no row is routed to are
    skipped, their weights never read."""
    vector_cols = n_in // LANES * LANES
    runs = (n_in + run - 1) // run  # the decoded row, padded to whole runs

    def source_row(order: tirx.Buffer, r: Any) -> Any:
        return order[r] // gather_k if gather_k else r

    @T.macro
    def body(x, starts, order, params, y):
        with T.sblock("root"):
            decoded = T.alloc_buffer((TASKS, runs * run), "float32")
            for e in range(num_experts):
                if starts[e + 1] > starts[e]:
                    for task in T.parallel(TASKS):
                        acc = T.alloc_buffer((TOKENS, LANES), "float32")
                        first_row, task_rows = T.meta_var(task_share(task, TASKS, n_out))
                        for row in range(task_rows):
                            o = T.meta_var(first_row + row)
                            for j in range(runs):
                                for i in T.vectorized(run):
                                    decoded[task, j * run + i] = weight_at(params, e, o, j, i, "float32")
                            full = T.meta_var((starts[e + 1] - starts[e]) // TOKENS)
                            for block in range(full):  # TOKENS rows at a time share each load of the row
                                for u in T.unroll(TOKENS):
                                    acc[u, T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                                for c8 in range(vector_cols // LANES):
                                    for u in T.unroll(TOKENS):
                                        src = T.meta_var(source_row(order, starts[e] + block * TOKENS + u))
                                        acc[u, T.Ramp(0, 1, LANES)] = (
                                            acc[u, T.Ramp(0, 1, LANES)]
                                            + x[src, T.Ramp(c8 * LANES, 1, LANES)]
                                            * decoded[task, T.Ramp(c8 * LANES, 1, LANES)]
                                        )
                                for u in T.unroll(TOKENS):
                                    r = T.meta_var(starts[e] + block * TOKENS + u)
                                    src = T.meta_var(source_row(order, r))
                                    for c in range(vector_cols, n_in):
                                        acc[u, 0] = acc[u, 0] + x[src, c] * decoded[task, c]
                                    y[r, o] = T.float32(0)
                                    for lane in range(LANES):
                                        y[r, o] = y[r, o] + acc[u, lane]
                            for r in range(starts[e] + full * TOKENS, starts[e + 1]):  # the rest one by one
                                src = T.meta_var(source_row(order, r))
                                acc[0, T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                                for c8 in range(vector_cols // LANES):
                                    acc[0, T.Ramp(0, 1, LANES)] = (
                                        acc[0, T.Ramp(0, 1, LANES)]
                                        + x[src, T.Ramp(c8 * LANES, 1, LANES)]
                                        * decoded[task, T.Ramp(c8 * LANES, 1, LANES)]
                                    )
                                for c in range(vector_cols, n_in):
                                    acc[0, 0] = acc[0, 0] + x[src, c] * decoded[task, c]
                                y[r, o] = T.float32(0)
                                for lane in range(LANES):
                                    y[r, o] = y[r, o] + acc[0, lane]

    specs = list(param_specs)
    # TVMScript has no variadic parameters: one signature per count of packed weight arrays.
    if len(specs) == 1:
        ((s0, d0),) = specs

        @T.prim_func(private=True, s_tir=True)
        def kernel1(var_x: T.handle, starts: T.Buffer((num_experts + 1,), "int32"), var_order: T.handle,
                    p0: T.Buffer(s0, d0), var_y: T.handle):  # fmt: skip
            T.func_attr({"tirx.noalias": True})
            n, m = T.int64(), T.int64()
            x = T.match_buffer(var_x, (n, n_in), "float32")
            order = T.match_buffer(var_order, (m,), "int32")
            y = T.match_buffer(var_y, (m, n_out), "float32")
            body(x, starts, order, [p0], y)

        return kernel1
    if len(specs) == 2:
        (s0, d0), (s1, d1) = specs

        @T.prim_func(private=True, s_tir=True)
        def kernel2(var_x: T.handle, starts: T.Buffer((num_experts + 1,), "int32"), var_order: T.handle,
                    p0: T.Buffer(s0, d0), p1: T.Buffer(s1, d1), var_y: T.handle):  # fmt: skip
            T.func_attr({"tirx.noalias": True})
            n, m = T.int64(), T.int64()
            x = T.match_buffer(var_x, (n, n_in), "float32")
            order = T.match_buffer(var_order, (m,), "int32")
            y = T.match_buffer(var_y, (m, n_out), "float32")
            body(x, starts, order, [p0, p1], y)

        return kernel2
    if len(specs) == 3:
        (s0, d0), (s1, d1), (s2, d2) = specs

        @T.prim_func(private=True, s_tir=True)
        def kernel3(var_x: T.handle, starts: T.Buffer((num_experts + 1,), "int32"), var_order: T.handle,
                    p0: T.Buffer(s0, d0), p1: T.Buffer(s1, d1), p2: T.Buffer(s2, d2), var_y: T.handle):  # fmt: skip
            T.func_attr({"tirx.noalias": True})
            n, m = T.int64(), T.int64()
            x = T.match_buffer(var_x, (n, n_in), "float32")
            order = T.match_buffer(var_order, (m,), "int32")
            y = T.match_buffer(var_y, (m, n_out), "float32")
            body(x, starts, order, [p0, p1, p2], y)

        return kernel3
    if len(specs) == 4:
        (s0, d0), (s1, d1), (s2, d2), (s3, d3) = specs

        @T.prim_func(private=True, s_tir=True)
        def kernel4(var_x: T.handle, starts: T.Buffer((num_experts + 1,), "int32"), var_order: T.handle,
                    p0: T.Buffer(s0, d0), p1: T.Buffer(s1, d1), p2: T.Buffer(s2, d2), p3: T.Buffer(s3, d3),
                    var_y: T.handle):  # fmt: skip
            T.func_attr({"tirx.noalias": True})
            n, m = T.int64(), T.int64()
            x = T.match_buffer(var_x, (n, n_in), "float32")
            order = T.match_buffer(var_order, (m,), "int32")
            y = T.match_buffer(var_y, (m, n_out), "float32")
            body(x, starts, order, [p0, p1, p2, p3], y)

        return kernel4
    raise ValueError(f"expert weights packed into {len(specs)} arrays are not supported")


@functools.cache
def grouped_rows_kernel(num_experts: int, rows: RowMatmul, gather_k: int) -> tirx.PrimFunc:
    """y[r] = W[e] @ x_r for every sorted pair row r of expert e, by a dense layer's kernel body (`rows`).

    The weights are the experts' packed arrays one after another ([experts * rows.data_shape[0], ...]). The
    pairs' token rows are first gathered into sorted order (when gather_k > 0; else x is already sorted), so
    that an expert's rows are contiguous; then the dense body runs once per expert with pairs, on views of its
    rows, its weights and its outputs. Experts no pair is routed to are skipped, their weights never read."""
    n_in, n_out, body = rows.n_in, rows.n_out, rows.body
    expert_rows, row_width = rows.data_shape
    data_shape = (num_experts * expert_rows, row_width)

    @T.macro
    def per_expert(source, starts, data, y, capacity):
        for e in range(num_experts):
            if starts[e + 1] > starts[e]:
                first: T.int64 = T.Cast("int64", starts[e])
                count: T.int64 = T.Cast("int64", starts[e + 1]) - first
                rows_in = T.meta_var(source[first : first + count, 0:n_in])
                weights = T.meta_var(data[e * expert_rows : (e + 1) * expert_rows, 0:row_width])
                rows_out = T.meta_var(y[first : first + count, 0:n_out])
                with T.sblock("expert"):  # the views, as match_buffer regions of a block
                    T.reads(rows_in, weights)
                    T.writes(rows_out)
                    xe = T.match_buffer(rows_in, (count, n_in), "float32", offset_factor=1)
                    de = T.match_buffer(weights, rows.data_shape, "uint8", offset_factor=1)
                    ye = T.match_buffer(rows_out, (count, n_out), "float32", offset_factor=1)
                    body(xe, de, ye, count, capacity)

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_x: T.handle, starts: T.Buffer((num_experts + 1,), "int32"), var_order: T.handle,
               data: T.Buffer(data_shape, "uint8"), var_y: T.handle):  # fmt: skip
        T.func_attr({"tirx.noalias": True})
        n, m = T.int64(), T.int64()
        x = T.match_buffer(var_x, (n, n_in), "float32")
        order = T.match_buffer(var_order, (m,), "int32")
        y = T.match_buffer(var_y, (m, n_out), "float32")
        if gather_k > 0:
            gathered = T.alloc_buffer((m, n_in), "float32")
            for r in T.parallel(m):
                for c in range(n_in):
                    gathered[r, c] = x[order[r] // gather_k, c]
            per_expert(gathered, starts, data, y, m)
        else:
            per_expert(x, starts, data, y, m)

    return kernel


class ExpertLinear(nn.Module):
    """All experts' [out, in] weights as one [experts, out, in] tensor, multiplied by grouped rows."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter((num_experts, out_features, in_features))
        self.run = LANES if in_features % LANES == 0 else 1  # columns the kernel copies per inner loop

    def packed_params(self) -> list[nn.Parameter]:
        return [self.weight]

    def weight_at(self, params: Sequence[tirx.Buffer], e: Any, o: Any, j: Any, i: Any, dtype: str) -> tirx.PrimExpr:
        return params[0][e, o, j * self.run + i].astype(dtype)

    def forward(self, x: Tensor, starts: Tensor, order: Tensor, gather_k: int) -> Tensor:
        return grouped_matmul(self, x, starts, order, gather_k)


def grouped_matmul(experts: Any, x: Tensor, starts: Tensor, order: Tensor, gather_k: int) -> Tensor:
    """x [n, in] float32 (tokens when gather_k, else sorted pair rows) -> [len(order), out] float32, by the
    experts' module (ExpertLinear or a scheme's packed one: `packed_params`, `weight_at`, sizes)."""
    params = experts.packed_params()
    specs = [(tuple(int(d) for d in p.shape), p.dtype) for p in params]
    kernel = grouped_matmul_kernel(
        experts.num_experts,
        experts.in_features,
        experts.out_features,
        specs,
        experts.weight_at,
        experts.run,
        gather_k,
    )
    out = Tensor.placeholder([order.shape[0], experts.out_features], "float32")
    return op.tensor_ir_op(kernel, "moe_matmul", [x, starts, order, *params], out)
