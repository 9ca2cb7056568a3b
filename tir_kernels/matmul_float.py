"""GGUF weights decoded to float inside the kernel (no int8 activations: other CPUs, GPUs, "gguf-f32"), as TE
compute definitions for `op.tensor_expr_op`: a matmul and row gathers (embeddings)."""

from __future__ import annotations

from collections.abc import Callable

from gguf import GGMLQuantizationType
from tvm import te, tirx

from tir_kernels.gguf_blocks import BlockFormat
from tir_kernels.repack import super_weight_at
from tir_kernels.simd import LANES


def decoded_matmul(fmt: BlockFormat, n_in: int, n_out: int, dtype: str) -> Callable[[te.Tensor, te.Tensor], te.Tensor]:
    """(x [..., n_in], GGUF rows [n_out, row bytes]) -> x @ W.T [..., n_out] in `dtype`, float32 accumulation."""

    def matmul(xt: te.Tensor, data: te.Tensor) -> te.Tensor:
        # A decode stage the CPU schedule computes one weight row at a time into a small local buffer, then a
        # plain dot product of that row with every token. The decode stage runs over 16-column runs that sit
        # in contiguous bytes, so its inner loop vectorizes; flattened, its index is just k.
        w = te.compute((n_out, n_in // 16, 16), lambda o, t, i: fmt.weight_at(data, o, t, i), name="gguf_dequant")
        k = te.reduce_axis((0, n_in), name="k")

        def dot(*idx):
            return te.sum(xt[(*idx[:-1], k)].astype("float32") * w[idx[-1], k // 16, k % 16], axis=k)

        y = te.compute((*xt.shape[:-1], n_out), dot, name="gguf_matmul")
        if dtype == "float32":
            return y
        return te.compute(y.shape, lambda *i: y[i].astype(dtype), name="gguf_matmul_cast")

    return matmul


def decoded_gather(fmt: BlockFormat, dim: int, dtype: str) -> Callable[[te.Tensor, te.Tensor], te.Tensor]:
    """(ids [...], GGUF rows [num, row bytes]) -> the rows decoded, [..., dim] in `dtype`."""

    def gather(idx: te.Tensor, data: te.Tensor) -> te.Tensor:
        return te.compute(
            (*idx.shape, dim),
            lambda *i: fmt.weight_at_col(data, idx[i[:-1]], i[-1]).astype(dtype),
            name="gguf_embed",
        )

    return gather


class _RowsInGroups:
    """GGUF rows [n, row bytes] read from rows stored 8 to a group as an int8 kernel reads them: byte j of row r
    sits at byte `order[r % 8, j]` of group r // 8."""

    def __init__(self, data: te.Tensor, order: te.Tensor):
        self.data, self.order = data, order

    def __getitem__(self, at: tuple) -> tirx.PrimExpr:
        row, byte = at
        return self.data[row // LANES, self.order[row % LANES, byte]]


def grouped_gather(fmt: BlockFormat, dim: int, dtype: str) -> Callable[[te.Tensor, te.Tensor, te.Tensor], te.Tensor]:
    """(ids [...], rows 8 to a group [groups, group bytes], their byte order [8, row bytes]) -> the rows decoded,
    [..., dim] in `dtype`: a tied embedding read from its output head's copy."""

    def gather(idx: te.Tensor, data: te.Tensor, order: te.Tensor) -> te.Tensor:
        rows = _RowsInGroups(data, order)
        return te.compute(
            (*idx.shape, dim),
            lambda *i: fmt.weight_at_col(rows, idx[i[:-1]], i[-1]).astype(dtype),
            name="gguf_embed",
        )

    return gather


def super_gather(qtype: GGMLQuantizationType, dim: int, dtype: str) -> Callable[[te.Tensor, te.Tensor], te.Tensor]:
    """(ids [...], K-quant rows 8 to a group in the int8 kernels' super-block layout [groups, bytes]) -> the rows
    decoded, [..., dim] in `dtype`: a tied K-quant embedding read from its output head's copy."""

    def gather(idx: te.Tensor, data: te.Tensor) -> te.Tensor:
        return te.compute(
            (*idx.shape, dim),
            lambda *i: super_weight_at(qtype, data, idx[i[:-1]], i[-1]).astype(dtype),
            name="gguf_embed",
        )

    return gather
