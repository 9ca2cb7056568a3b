"""Group quantization along the input dimension: `bits`-bit codes, one scale (and for asymmetric formats one
minimum) per `group_size` consecutive inputs of a weight row.

- Symmetric: w = (q - 2^(bits-1)) * scale. As in llama.cpp's Q4_0/Q8_0 the scale is signed, so the group's
  largest-magnitude weight lands on code 0 and all 2^bits codes are used (a 2-bit group has 4 levels, not 3).
- Asymmetric: w = q * scale + minimum, the codes spanning the group's own range.
- Scales are searched, not just taken from the group's extreme: a few candidate clipping ranges, each with a
  least-squares refit, keep the one with the smallest squared error (a light version of llama.cpp's
  make_qx_quants), which matters most at 2 and 3 bits.

Packing: codes are split into bit planes, each plane packed little-end-first into uint32 words along the input
dimension: 2, 4 and 8 bits are one plane; 3 bits = a 2-bit plane + a 1-bit plane, 5 bits = 4 + 1, 6 bits =
4 + 2 (the low plane holds the low bits). Every plane of a 32-column group fills whole words, so the kernel
decodes a run of 8 or 16 contiguous columns with one shift and mask per plane, and the run vectorizes.

Dequantization happens inside the matmul's reduction (and inside the embedding gather), so no float copy of a
weight is ever materialised. A row the group size does not divide is zero-padded to whole groups; the
quantized model's summary lists those tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from quant_schemes.base import PackedModule, QuantScheme
from tir_kernels.experts import ExpertLinear, grouped_matmul

# Bit widths of the planes a code is split into, low plane first.
PLANES = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}
PLANE_PARAMS = ("q_weight", "q_high")
# Candidate clipping ranges (fractions of the group's extreme) the scale search tries.
CLIP_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
# Weights quantized at once: bounds each float temporary of the search to 16 MB, whatever the tensor's size.
CHUNK_ELEMENTS = 1 << 22


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class GroupQuantFormat:
    """One weight encoding, shared by the host-side packer and the kernel-side decoder."""

    bits: int
    group_size: int = 32
    asymmetric: bool = False
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.bits not in PLANES:
            raise ValueError(f"{self.bits}-bit group quantization is not supported; supported: {sorted(PLANES)}")
        if self.group_size % 32:
            raise ValueError("the group size must be a multiple of 32 (the width of one packed word of bits)")

    @property
    def planes(self) -> tuple[int, ...]:
        return PLANES[self.bits]

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def offset(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def run(self) -> int:
        """Contiguous columns the kernel decodes per inner loop: one word of the low plane, at least 8."""
        return max(8, 32 // self.planes[0])

    def bits_per_weight(self) -> float:
        per_group = (2 if self.asymmetric else 1) * np.dtype(self.scale_dtype).itemsize * 8
        return self.bits + per_group / self.group_size

    def padded(self, cols: int) -> int:
        return _ceil_div(cols, self.group_size) * self.group_size

    def param_shapes(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, int], str]]:
        """Parameter suffix -> (shape, dtype) of a [rows, cols] weight."""
        padded, groups = self.padded(cols), self.padded(cols) // self.group_size
        shapes = {name: ((rows, padded * width // 32), "uint32") for name, width in zip(PLANE_PARAMS, self.planes)}
        shapes["q_scale"] = ((rows, groups), self.scale_dtype)
        if self.asymmetric:
            shapes["q_min"] = ((rows, groups), self.scale_dtype)
        return shapes

    # ---- host side ----------------------------------------------------------------------------------
    def quantize(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """[rows, cols] float -> parameter suffix -> packed array, a chunk of rows at a time."""
        step = max(1, CHUNK_ELEMENTS // self.padded(w.shape[1]))
        chunks = [self._quantize_rows(w[i : i + step]) for i in range(0, w.shape[0], step)]
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

    def _quantize_rows(self, w: np.ndarray) -> dict[str, np.ndarray]:
        rows, cols = w.shape
        x = np.zeros((rows, self.padded(cols)), np.float32)
        x[:, :cols] = w
        x = x.reshape(rows, -1, self.group_size)
        fit = self._fit_asymmetric if self.asymmetric else self._fit_symmetric
        codes, params = fit(x)
        params.update(self._pack(codes.reshape(rows, -1)))
        return params

    def _fit_symmetric(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        signed_max = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
        best_scale, best_err = np.zeros_like(signed_max), np.full(signed_max.shape, np.inf, np.float32)
        for clip in CLIP_CANDIDATES:
            scale = signed_max * clip / -self.offset
            q = self._round(x, scale, 0.0)
            refit = _least_squares_scale(x, q)
            scale = np.where(refit != 0, refit, scale)
            err = np.square(x - q * scale[..., None]).sum(-1)
            better = err < best_err
            best_scale, best_err = np.where(better, scale, best_scale), np.where(better, err, best_err)
        scale = best_scale.astype(self.scale_dtype)
        q = self._round(x, scale.astype(np.float32), 0.0) + self.offset
        return q, {"q_scale": scale}

    def _fit_asymmetric(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        low, high = x.min(-1), x.max(-1)
        best = (np.zeros_like(low), low, np.full(low.shape, np.inf, np.float32))
        for clip in CLIP_CANDIDATES:
            centre, half = (high + low) / 2, (high - low) * clip / 2
            scale, minimum = 2 * half / (self.levels - 1), centre - half
            q = np.clip(self._round(x, scale, minimum), 0, self.levels - 1)
            scale, minimum = _least_squares_affine(x, q, scale, minimum)
            err = np.square(x - q * scale[..., None] - minimum[..., None]).sum(-1)
            better = err < best[2]
            best = tuple(np.where(better, new, old) for new, old in zip((scale, minimum, err), best))
        scale, minimum = best[0].astype(self.scale_dtype), best[1].astype(self.scale_dtype)
        q = np.clip(self._round(x, scale.astype(np.float32), minimum.astype(np.float32)), 0, self.levels - 1)
        return q, {"q_scale": scale, "q_min": minimum}

    def _round(self, x: np.ndarray, scale: np.ndarray, minimum: np.ndarray | float) -> np.ndarray:
        """Nearest code of every weight; symmetric codes are centred (before adding the offset)."""
        minimum = minimum[..., None] if isinstance(minimum, np.ndarray) else minimum
        safe = np.where(scale == 0, 1, scale)[..., None]
        q = np.round((x - minimum) / safe)
        return q if self.asymmetric else np.clip(q, -self.offset, self.offset - 1)

    def _pack(self, codes: np.ndarray) -> dict[str, np.ndarray]:
        codes = codes.astype(np.uint32)
        packed, shift = {}, 0
        for name, width in zip(PLANE_PARAMS, self.planes):
            plane = (codes >> np.uint32(shift)) & np.uint32((1 << width) - 1)
            per_word = 32 // width
            words = np.zeros((codes.shape[0], codes.shape[1] // per_word), np.uint32)
            for j in range(per_word):
                words |= plane[:, j::per_word] << np.uint32(width * j)
            packed[name], shift = words, shift + width
        return packed

    def dequantize(self, params: dict[str, np.ndarray], cols: int) -> np.ndarray:
        """Host-side inverse of `quantize`, for tests and references."""
        codes, shift = 0, 0
        for name, width in zip(PLANE_PARAMS, self.planes):
            words = params[name]
            shifts = (np.arange(32 // width, dtype=np.uint32) * width)[None, None, :]
            plane = (words[..., None] >> shifts) & np.uint32((1 << width) - 1)
            codes, shift = codes | (plane.reshape(words.shape[0], -1) << np.uint32(shift)), shift + width
        q = codes[:, :cols].astype(np.float32)
        scale = np.repeat(params["q_scale"].astype(np.float32), self.group_size, axis=1)[:, :cols]
        if self.asymmetric:
            return q * scale + np.repeat(params["q_min"].astype(np.float32), self.group_size, axis=1)[:, :cols]
        return (q - self.offset) * scale

    # ---- kernel side --------------------------------------------------------------------------------
    def weight_at(
        self, params: dict[str, te.Tensor], row: tirx.PrimExpr, col: tirx.PrimExpr, dtype: str
    ) -> tirx.PrimExpr:
        """TIR expression of one dequantized weight element."""
        code, shift = None, 0
        for name, width in zip(PLANE_PARAMS, self.planes):
            per_word = 32 // width
            bits = tirx.bitwise_and(
                tirx.shift_right(params[name][row, col // per_word], ((col % per_word) * width).astype("uint32")),
                tirx.const((1 << width) - 1, "uint32"),
            )
            if shift:
                bits = tirx.shift_left(bits, tirx.const(shift, "uint32"))
            code, shift = bits if code is None else tirx.bitwise_or(code, bits), shift + width
        group = col // self.group_size
        scale = params["q_scale"][row, group].astype(dtype)
        if self.asymmetric:
            return code.astype(dtype) * scale + params["q_min"][row, group].astype(dtype)
        return (code.astype(dtype) - tirx.const(self.offset, dtype)) * scale


def dequant_matmul(fmt: GroupQuantFormat, n_in: int, n_out: int, dtype: str) -> Callable[..., te.Tensor]:
    """te function (x, *packed params in `param_shapes` order) -> x @ dequant(W).T.

    The "q_dequant" stage is what the CPU schedule computes one weight row at a time into a local buffer; its
    innermost loop decodes `fmt.run` contiguous columns, so it vectorizes."""
    names = list(fmt.param_shapes(n_out, n_in))
    run = fmt.run

    def matmul(xt: te.Tensor, *packed: te.Tensor) -> te.Tensor:
        params = dict(zip(names, packed))
        w = te.compute(
            (n_out, fmt.padded(n_in) // run, run),
            lambda o, j, e: fmt.weight_at(params, o, j * run + e, "float32"),
            name="q_dequant",
        )
        k = te.reduce_axis((0, n_in), name="k")
        y = te.compute(
            (*xt.shape[:-1], n_out),
            lambda *i: te.sum(xt[(*i[:-1], k)].astype("float32") * w[i[-1], k // run, k % run], axis=k),
            name="q_matmul",
        )
        if dtype == "float32":
            return y
        return te.compute(y.shape, lambda *i: y[i].astype(dtype), name="q_matmul_cast")

    return matmul


def dequant_gather(fmt: GroupQuantFormat, num: int, dim: int, dtype: str) -> Callable[..., te.Tensor]:
    """te function (ids, *packed params) -> the rows of dequant(W) at `ids`."""
    names = list(fmt.param_shapes(num, dim))

    def gather(idx: te.Tensor, *packed: te.Tensor) -> te.Tensor:
        params = dict(zip(names, packed))
        return te.compute(
            (*idx.shape, dim), lambda *i: fmt.weight_at(params, idx[i[:-1]], i[-1], dtype), name="q_embed"
        )

    return gather


class _GroupQuantWeight(PackedModule):
    """The packed parameters of one [rows, cols] weight, named after `GroupQuantFormat.param_shapes`."""

    def __init__(self, fmt: GroupQuantFormat, rows: int, cols: int):
        self.fmt = fmt
        shapes = fmt.param_shapes(rows, cols)
        self.param_names = tuple(shapes)
        for name, (shape, dtype) in shapes.items():
            setattr(self, name, nn.Parameter(shape, dtype))

    def packed_params(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in self.param_names]

    def to(self, dtype: str | None = None) -> None:  # the packing is fixed; Module.to() must not cast it
        return

    def pack_weight(self, weight: np.ndarray) -> dict[str, np.ndarray]:
        return self.fmt.quantize(weight.astype(np.float32))


class GroupQuantLinear(_GroupQuantWeight):
    """y = x @ dequant(W).T + b, dequantize fused into the reduction, float32 accumulation."""

    def __init__(self, fmt: GroupQuantFormat, in_features: int, out_features: int, bias: bool, dtype: str):
        super().__init__(fmt, out_features, in_features)
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        matmul = dequant_matmul(self.fmt, self.in_features, self.out_features, self.dtype)
        y = op.tensor_expr_op(matmul, "q_matmul", [x, *self.packed_params()])
        return y + self.bias if self.bias is not None else y


class GroupQuantEmbedding(_GroupQuantWeight):
    """Row gather with the row dequantized on the fly."""

    def __init__(self, fmt: GroupQuantFormat, num: int, dim: int, dtype: str):
        super().__init__(fmt, num, dim)
        self.num, self.dim, self.dtype = num, dim, dtype

    def forward(self, ids: Tensor) -> Tensor:
        gather = dequant_gather(self.fmt, self.num, self.dim, self.dtype)
        return op.tensor_expr_op(gather, "q_embed", [ids, *self.packed_params()])


class GroupQuantExperts(_GroupQuantWeight):
    """A mixture's [experts, out, in] weights as one [experts * out, in] packed matrix, multiplied by grouped
    rows (tir_kernels/experts.py), each element dequantized as the kernel reads it."""

    def __init__(self, fmt: GroupQuantFormat, num_experts: int, in_features: int, out_features: int):
        super().__init__(fmt, num_experts * out_features, in_features)
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.run = fmt.run  # columns decoded per (vector) inner loop

    def pack_weight(self, weight: np.ndarray) -> dict[str, np.ndarray]:
        return super().pack_weight(weight.reshape(self.num_experts * self.out_features, self.in_features))

    def weight_at(
        self, params: list, e: tirx.PrimExpr, o: tirx.PrimExpr, j: tirx.PrimExpr, i: tirx.PrimExpr, dtype: str
    ):
        """The weight at column j * run + i (past in_features: the zero padding)."""
        row = e * self.out_features + o
        return self.fmt.weight_at(dict(zip(self.param_names, params)), row, j * self.run + i, dtype)

    def forward(self, x: Tensor, starts: Tensor, order: Tensor, gather_k: int) -> Tensor:
        return grouped_matmul(self, x, starts, order, gather_k)


class GroupQuantScheme(QuantScheme):
    """Every linear layer and the embedding in groups of `fmt`; norms and biases stay float.

    `overrides` maps a tensor's role (the last part of its GGUF name: `output`, `token_embd`, `attn_v`, ...)
    to a wider format, as llama.cpp's mixes give the output head and the most sensitive matrices more bits."""

    def __init__(
        self,
        name: str,
        fmt: GroupQuantFormat,
        overrides: dict[str, GroupQuantFormat] | None = None,
        dtype: str = "float32",
    ):
        self.name, self.fmt, self.overrides, self.dtype = name, fmt, dict(overrides or {}), dtype
        kind = "asymmetric (scale + min)" if fmt.asymmetric else "symmetric"
        mix = "".join(f", {role} {_label(f)}" for role, f in self.overrides.items())
        self.description = (
            f"{fmt.bits}-bit {kind}, group {fmt.group_size}, {fmt.scale_dtype} scales{mix}, {dtype} activations"
        )

    def bits_per_weight(self) -> float:
        return self.fmt.bits_per_weight()

    def describe(self) -> dict:
        overrides = {role: _label(f) for role, f in self.overrides.items()}
        return {**super().describe(), "group_size": self.fmt.group_size, "overrides": overrides}

    def format_for(self, module_path: str) -> GroupQuantFormat:
        return self.overrides.get(module_path.rsplit(".", 1)[-1], self.fmt)

    def quantize_model(self, model: nn.Module) -> list[str]:
        scheme, padded = self, []

        class Swap(nn.Mutator):
            def visit_module(self, name: str, node: nn.Module) -> nn.Module:
                fmt = scheme.format_for(name)
                if isinstance(node, nn.Linear):
                    rows, cols = node.out_features, node.in_features
                    new: nn.Module = GroupQuantLinear(fmt, cols, rows, node.bias is not None, scheme.dtype)
                elif isinstance(node, ExpertLinear):  # ffn_down_exps takes ffn_down's format
                    rows, cols, fmt = node.out_features, node.in_features, scheme.format_for(name.removesuffix("_exps"))
                    new = GroupQuantExperts(fmt, node.num_experts, cols, rows)
                elif isinstance(node, nn.Embedding):
                    rows, cols = (int(d) for d in node.weight.shape)
                    new = GroupQuantEmbedding(fmt, rows, cols, scheme.dtype)
                else:
                    return self.visit(name, node)
                if fmt.padded(cols) != cols:
                    padded.append(f"{name} ({cols} -> {fmt.padded(cols)})")
                return new

        model.to(self.dtype)
        Swap().visit("", model)
        notes = [f"{self.name}: {self.description}"]
        if padded:
            notes.append(f"{self.name}: rows zero-padded to whole groups of {self.fmt.group_size}: {', '.join(padded)}")
        return notes


def _label(fmt: GroupQuantFormat) -> str:
    return f"{fmt.bits}-bit{' asymmetric' if fmt.asymmetric else ''}"


def _least_squares_scale(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The scale d minimising |x - q d|^2 per group (0 where every code is 0)."""
    qq = np.square(q).sum(-1)
    return np.where(qq > 0, (q * x).sum(-1) / np.where(qq > 0, qq, 1), 0).astype(np.float32)


def _least_squares_affine(
    x: np.ndarray, q: np.ndarray, scale: np.ndarray, minimum: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(d, m) minimising |x - (q d + m)|^2 per group; the given pair where the codes are all equal."""
    n = x.shape[-1]
    sq, sx, sqq, sqx = q.sum(-1), x.sum(-1), np.square(q).sum(-1), (q * x).sum(-1)
    det = n * sqq - sq * sq
    ok = det > 0
    safe = np.where(ok, det, 1)
    fitted_scale = (n * sqx - sq * sx) / safe
    fitted_min = (sqq * sx - sq * sqx) / safe
    return np.where(ok, fitted_scale, scale).astype(np.float32), np.where(ok, fitted_min, minimum).astype(np.float32)
