"""Symmetric group quantization: `bits`-bit integers packed into uint32 words along the input dimension,
one float16 scale per `group_size` inputs. w = (q - 2^(bits-1)) * scale.

Dequantization happens inside the reduction of the matmul (and inside the embedding gather), so no float
copy of a weight is ever materialised. A dimension the group size does not divide is zero-padded.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from quant_schemes.base import PackedModule, QuantScheme


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class GroupQuantFormat:
    """The packing shared by the linear and the embedding layers, on the host and in the kernel."""

    def __init__(self, bits: int, group_size: int, scale_dtype: str = "float16"):
        assert 32 % bits == 0, "bit widths that do not divide 32 need a different packing"
        self.bits, self.group_size, self.scale_dtype = bits, group_size, scale_dtype
        self.per_word = 32 // bits
        self.offset = 1 << (bits - 1)
        self.qmax = self.offset - 1

    def shapes(self, rows: int, cols: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return (rows, _ceil_div(cols, self.per_word)), (rows, _ceil_div(cols, self.group_size))

    def quantize(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[rows, cols] float -> (packed uint32 [rows, words], scales [rows, groups])."""
        rows, cols = w.shape
        groups = _ceil_div(cols, self.group_size)
        padded = np.zeros((rows, groups * self.group_size), np.float32)
        padded[:, :cols] = w
        grouped = padded.reshape(rows, groups, self.group_size)
        scale = (np.abs(grouped).max(-1) / self.qmax).astype(self.scale_dtype)
        safe = np.where(scale == 0, 1, scale).astype(np.float32)[..., None]
        q = np.clip(np.round(grouped / safe), -self.qmax, self.qmax).astype(np.int64) + self.offset
        q = q.reshape(rows, -1)[:, :cols].astype(np.uint32)
        words = _ceil_div(cols, self.per_word)
        q = np.pad(q, ((0, 0), (0, words * self.per_word - cols)))
        packed = np.zeros((rows, words), np.uint32)
        for j in range(self.per_word):
            packed |= q[:, j :: self.per_word] << np.uint32(self.bits * j)
        return packed, scale

    def dequantize(self, packed: np.ndarray, scale: np.ndarray, cols: int) -> np.ndarray:
        """Host-side inverse of `quantize`, for tests and re-quantization."""
        shifts = (np.arange(self.per_word, dtype=np.uint32) * self.bits)[None, None, :]
        q = (packed[..., None] >> shifts) & np.uint32((1 << self.bits) - 1)
        q = q.reshape(packed.shape[0], -1)[:, :cols].astype(np.float32) - self.offset
        s = np.repeat(scale.astype(np.float32), self.group_size, axis=1)[:, :cols]
        return q * s

    def weight_at(self, qw: te.Tensor, scale: te.Tensor, row: tirx.PrimExpr, col: tirx.PrimExpr, dtype: str):
        """TIR expression of one dequantized weight element."""
        shift = ((col % self.per_word) * self.bits).astype("uint32")
        q = tirx.bitwise_and(
            tirx.shift_right(qw[row, col // self.per_word], shift), tirx.const((1 << self.bits) - 1, "uint32")
        )
        return (q.astype(dtype) - tirx.const(self.offset, dtype)) * scale[row, col // self.group_size].astype(dtype)


class GroupQuantLinear(PackedModule):
    """y = x @ dequant(W).T + b, dequantize fused into the reduction, float32 accumulation."""

    def __init__(self, fmt: GroupQuantFormat, in_features: int, out_features: int, bias: bool, dtype: str):
        self.fmt, self.in_features, self.out_features, self.dtype = fmt, in_features, out_features, dtype
        qshape, sshape = fmt.shapes(out_features, in_features)
        self.q_weight = nn.Parameter(qshape, "uint32")
        self.q_scale = nn.Parameter(sshape, fmt.scale_dtype)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def to(self, dtype: str | None = None) -> None:  # the packing is fixed; Module.to() must not cast it
        return

    def pack_weight(self, weight: np.ndarray) -> dict[str, np.ndarray]:
        packed, scale = self.fmt.quantize(weight.astype(np.float32))
        return {"q_weight": packed, "q_scale": scale}

    def forward(self, x: Tensor) -> Tensor:
        fmt, n_in, n_out, dtype = self.fmt, self.in_features, self.out_features, self.dtype

        def matmul(xt: te.Tensor, qw: te.Tensor, sc: te.Tensor) -> te.Tensor:
            # A dequantize stage the CPU schedule computes one weight row at a time into a local buffer. Over
            # (word, element) its inner loop shifts one loaded word, so it vectorizes.
            per_word = fmt.per_word
            if n_in % per_word == 0:
                w = te.compute(
                    (n_out, n_in // per_word, per_word),
                    lambda o, j, e: fmt.weight_at(qw, sc, o, j * per_word + e, "float32"),
                    name="q_dequant",
                )

                def w_at(o, kk):
                    return w[o, kk // per_word, kk % per_word]
            else:
                w = te.compute((n_out, n_in), lambda o, kk: fmt.weight_at(qw, sc, o, kk, "float32"), name="q_dequant")

                def w_at(o, kk):
                    return w[o, kk]

            k = te.reduce_axis((0, n_in), name="k")
            y = te.compute(
                (*xt.shape[:-1], n_out),
                lambda *i: te.sum(xt[(*i[:-1], k)].astype("float32") * w_at(i[-1], k), axis=k),
                name="q_matmul",
            )
            if dtype == "float32":
                return y
            return te.compute(y.shape, lambda *i: y[i].astype(dtype), name="q_matmul_cast")

        y = op.tensor_expr_op(matmul, "q_matmul", [x, self.q_weight, self.q_scale])
        return y + self.bias if self.bias is not None else y


class GroupQuantEmbedding(PackedModule):
    """Row gather with the row dequantized on the fly."""

    def __init__(self, fmt: GroupQuantFormat, num: int, dim: int, dtype: str):
        self.fmt, self.num, self.dim, self.dtype = fmt, num, dim, dtype
        qshape, sshape = fmt.shapes(num, dim)
        self.q_weight = nn.Parameter(qshape, "uint32")
        self.q_scale = nn.Parameter(sshape, fmt.scale_dtype)

    def to(self, dtype: str | None = None) -> None:
        return

    def pack_weight(self, weight: np.ndarray) -> dict[str, np.ndarray]:
        packed, scale = self.fmt.quantize(weight.astype(np.float32))
        return {"q_weight": packed, "q_scale": scale}

    def forward(self, ids: Tensor) -> Tensor:
        fmt, dim, dtype = self.fmt, self.dim, self.dtype

        def gather(idx: te.Tensor, qw: te.Tensor, sc: te.Tensor) -> te.Tensor:
            return te.compute(
                (*idx.shape, dim), lambda *i: fmt.weight_at(qw, sc, idx[i[:-1]], i[-1], dtype), name="q_embed"
            )

        return op.tensor_expr_op(gather, "q_embed", [ids, self.q_weight, self.q_scale])


class GroupQuantScheme(QuantScheme):
    """All linear layers and the embedding in `bits`-bit groups; norms and biases in float."""

    def __init__(self, name: str, bits: int, group_size: int = 32, dtype: str = "float32"):
        self.name, self.dtype = name, dtype
        self.fmt = GroupQuantFormat(bits, group_size)
        self.description = f"{bits}-bit symmetric, group {group_size}, float16 scales, {dtype} activations"

    def bits_per_weight(self) -> float:
        return self.fmt.bits + 16 / self.fmt.group_size

    def quantize_model(self, model: nn.Module) -> list[str]:
        scheme = self

        class Swap(nn.Mutator):
            def visit_module(self, name: str, node: nn.Module) -> nn.Module:
                if isinstance(node, nn.Linear):
                    return GroupQuantLinear(
                        scheme.fmt, node.in_features, node.out_features, node.bias is not None, scheme.dtype
                    )
                if isinstance(node, nn.Embedding):
                    num, dim = (int(d) for d in node.weight.shape)
                    return GroupQuantEmbedding(scheme.fmt, num, dim, scheme.dtype)
                return self.visit(name, node)

        model.to(self.dtype)
        Swap().visit("", model)
        return []
