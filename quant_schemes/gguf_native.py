"""GGUF block quantization run natively: the GGUF bytes are the parameters, decoded inside the kernels.

Each weight keeps llama.cpp's block layout (one row of blocks per output row), so nothing is re-quantized
and the compiled matmul decodes exactly the weights llama.cpp decodes. Supported block types: Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; F32/F16/BF16 tensors are converted to the model's float type.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.target import Target

from artifacts.errors import MlccError
from model_defs.common import GeGLU, NeoxRope, SwiGLU
from model_defs.moe import ExpertLinear, grouped_matmul
from quant_schemes.base import PackedModule, QuantScheme

Q = GGMLQuantizationType
FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16}


def _u8(data: te.Tensor, row: tirx.PrimExpr, byte: tirx.PrimExpr) -> tirx.PrimExpr:
    return data[row, byte].astype("uint32")


def _f16(data: te.Tensor, row: tirx.PrimExpr, byte: tirx.PrimExpr) -> tirx.PrimExpr:
    """A little-endian float16 stored at `byte`, as float32."""
    bits = _u8(data, row, byte) | (_u8(data, row, byte + 1) << tirx.const(8, "uint32"))
    return tirx.reinterpret("float16", bits.astype("uint16")).astype("float32")


def _nibble(data: te.Tensor, row: tirx.PrimExpr, base: tirx.PrimExpr, half, i) -> tirx.PrimExpr:
    """Element half*16 + i of a 32-element block whose 16 nibble bytes start at `base`: the low nibbles
    hold elements 0..15, the high nibbles 16..31."""
    shift = (half * 4).astype("uint32")
    return (_u8(data, row, base + i) >> shift) & tirx.const(0xF, "uint32")


def _high_bit(data: te.Tensor, row: tirx.PrimExpr, base: tirx.PrimExpr, half, i) -> tirx.PrimExpr:
    """Bit half*16 + i of the 32-bit little-endian `qh` field of Q5 blocks, moved to bit 4."""
    byte = _u8(data, row, base + half * 2 + i // 8)
    return ((byte >> (i % 8).astype("uint32")) & tirx.const(1, "uint32")) << tirx.const(4, "uint32")


# Decoders of the weight at column 16 * t + i of row r, as float32. Every type keeps 16 consecutive columns
# in consecutive bytes (or nibbles of them), so the inner loop over i reads contiguous memory and vectorizes.
# The layouts follow ggml's dequantize_row_* functions.
def _i8(d, r, byte):
    return d[r, byte].astype("int8").astype("float32")


def _q4_0(d, r, t, i):
    o = (t // 2) * 18
    return _f16(d, r, o) * (_nibble(d, r, o + 2, t % 2, i).astype("float32") - 8.0)


def _q4_1(d, r, t, i):
    o = (t // 2) * 20
    return _f16(d, r, o) * _nibble(d, r, o + 4, t % 2, i).astype("float32") + _f16(d, r, o + 2)


def _q5_0(d, r, t, i):
    o = (t // 2) * 22
    q = _nibble(d, r, o + 6, t % 2, i) | _high_bit(d, r, o + 2, t % 2, i)
    return _f16(d, r, o) * (q.astype("float32") - 16.0)


def _q5_1(d, r, t, i):
    o = (t // 2) * 24
    q = _nibble(d, r, o + 8, t % 2, i) | _high_bit(d, r, o + 4, t % 2, i)
    return _f16(d, r, o) * q.astype("float32") + _f16(d, r, o + 2)


def _q8_0(d, r, t, i):
    o = (t // 2) * 34
    return _f16(d, r, o) * _i8(d, r, o + 2 + (t % 2) * 16 + i)


def _k_scale_min(d, r, o, sub):
    """6-bit scale and min of sub-block `sub` (0..7) from the 12 packed bytes at o (ggml get_scale_min_k4)."""
    low = sub < 4
    s_lo, m_lo = _u8(d, r, o + sub % 4) & 63, _u8(d, r, o + sub % 4 + 4) & 63
    hi = _u8(d, r, o + sub % 4 + 8)
    s_hi = (hi & 0xF) | ((_u8(d, r, o + sub % 4) >> 6) << 4)
    m_hi = (hi >> 4) | ((_u8(d, r, o + sub % 4 + 4) >> 6) << 4)
    return tirx.if_then_else(low, s_lo, s_hi).astype("float32"), tirx.if_then_else(low, m_lo, m_hi).astype("float32")


def _q4_k(d, r, t, i):
    """256-element super-block: d, dmin, 12 bytes of scales/mins, then 128 bytes: 4 chunks of 32 bytes, low
    nibbles for columns 0..31 of a 64-column chunk, high nibbles for 32..63."""
    o, u = (t // 16) * 144, t % 16  # u: 16-column run within the super-block
    chunk, upper, half = u // 4, (u // 2) % 2, u % 2
    scale, minimum = _k_scale_min(d, r, o + 4, chunk * 2 + upper)
    q = (_u8(d, r, o + 16 + chunk * 32 + half * 16 + i) >> (upper * 4).astype("uint32")) & tirx.const(15, "uint32")
    return _f16(d, r, o) * scale * q.astype("float32") - _f16(d, r, o + 2) * minimum


def _q5_k(d, r, t, i):
    """Like Q4_K plus one high bit per column in 32 bytes after the scales (bit `sub` of qh[column % 32])."""
    o, u = (t // 16) * 176, t % 16
    chunk, upper, half = u // 4, (u // 2) % 2, u % 2
    sub = chunk * 2 + upper
    scale, minimum = _k_scale_min(d, r, o + 4, sub)
    low = (_u8(d, r, o + 48 + chunk * 32 + half * 16 + i) >> (upper * 4).astype("uint32")) & tirx.const(15, "uint32")
    high = ((_u8(d, r, o + 16 + half * 16 + i) >> sub.astype("uint32")) & tirx.const(1, "uint32")) << tirx.const(
        4, "uint32"
    )
    return _f16(d, r, o) * scale * (low | high).astype("float32") - _f16(d, r, o + 2) * minimum


def _q6_k(d, r, t, i):
    """256-element super-block: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d."""
    o, u = (t // 16) * 210, t % 16
    n, g, lh = u // 8, (u // 2) % 4, u % 2  # 128-column half, quarter within it, 16-run within 32
    col = lh * 16 + i  # 0..31 within the quarter
    low = (_u8(d, r, o + n * 64 + (g % 2) * 32 + col) >> ((g // 2) * 4).astype("uint32")) & tirx.const(15, "uint32")
    high = (_u8(d, r, o + 128 + n * 32 + col) >> (g * 2).astype("uint32")) & tirx.const(3, "uint32")
    q = (low | (high << tirx.const(4, "uint32"))).astype("float32") - 32.0
    return _f16(d, r, o + 208) * _i8(d, r, o + 192 + n * 8 + lh + 2 * g) * q


DECODERS: dict[GGMLQuantizationType, Callable] = {
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q8_0: _q8_0,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}
SUPPORTED = sorted(t.name for t in (*DECODERS, *FLOAT_TYPES))


class BlockFormat:
    def __init__(self, qtype: GGMLQuantizationType):
        if qtype not in DECODERS:
            raise MlccError(f"GGUF quant type {qtype.name} is not supported yet; supported: {', '.join(SUPPORTED)}")
        self.qtype = qtype
        self.block, self.block_bytes = GGML_QUANT_SIZES[qtype]
        self.decode = DECODERS[qtype]

    def row_bytes(self, cols: int) -> int:
        if cols % self.block:
            raise MlccError(f"a row of {cols} does not fill whole {self.qtype.name} blocks")
        return cols // self.block * self.block_bytes

    def weight_at(self, data: te.Tensor, row: tirx.PrimExpr, run: tirx.PrimExpr, i: tirx.PrimExpr) -> tirx.PrimExpr:
        """Float32 TIR expression of the weight at column 16 * run + i."""
        return self.decode(data, row, run, i)

    def weight_at_col(self, data: te.Tensor, row: tirx.PrimExpr, col: tirx.PrimExpr) -> tirx.PrimExpr:
        return self.decode(data, row, col // 16, col % 16)


class GGUFLinear(PackedModule):
    """y = x @ W.T (+ b) with W held as GGUF blocks and decoded in the reduction; float32 accumulation.

    With `int8_activations` (x86 CPUs with AVX2), x is quantized to 8 bits per 32 columns and multiplied in
    integers, as llama.cpp does (quant_schemes/gguf_int8.py); otherwise the weights are decoded to float.
    """

    def __init__(
        self,
        fmt: BlockFormat,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: str,
        int8_activations: bool,
        llamacpp: bool = False,
        vnni: bool = False,
    ):
        from quant_schemes.gguf_exact import EXACT_TYPES, group_bytes
        from quant_schemes.gguf_int8 import INTERLEAVED, LANE_ROWS

        self.fmt, self.in_features, self.out_features, self.dtype = fmt, in_features, out_features, dtype
        self.int8_activations = int8_activations and dtype == "float32"
        self.llamacpp = llamacpp and self.int8_activations  # llama.cpp's own order of operations
        self.vnni = vnni  # the target has `vpdpbusd` (the same integers, fewer instructions)
        # The int8 kernels read some types with 8 rows' blocks interleaved (the same bits, reordered).
        self.interleaved = self.int8_activations and fmt.qtype in (EXACT_TYPES if self.llamacpp else INTERLEAVED)
        row_bytes = fmt.row_bytes(in_features)
        if self.interleaved and self.llamacpp:
            shape = (-(-out_features // LANE_ROWS), group_bytes(fmt.qtype, in_features))
        elif self.interleaved:
            shape = (-(-out_features // LANE_ROWS), row_bytes * LANE_ROWS)
        else:
            shape = (out_features, row_bytes)
        self.q_data = nn.Parameter(shape, "uint8")
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def to(self, dtype: str | None = None) -> None:
        return

    def pack_weight(self, weight: np.ndarray) -> dict[str, np.ndarray]:
        from quant_schemes.gguf_exact import group_rows
        from quant_schemes.gguf_int8 import interleave_rows

        rows = weight.view(np.uint8).reshape(self.out_features, -1)
        if not self.interleaved:
            return {"q_data": rows}
        return {"q_data": (group_rows if self.llamacpp else interleave_rows)(rows, self.fmt.qtype)}

    def forward(self, x: Tensor) -> Tensor:
        y = self._int8_matmul(x) if self.int8_activations else self._float_matmul(x)
        return y + self.bias if self.bias is not None else y

    def _int8_matmul(self, x: Tensor) -> Tensor:
        from quant_schemes.gguf_exact import exact_matmul
        from quant_schemes.gguf_int8 import int8_matmul

        n_in, n_out, row_bytes = self.in_features, self.out_features, self.fmt.row_bytes(self.in_features)
        rows = op.reshape(x, (-1, n_in))  # [b*s, n_in]
        if self.llamacpp:
            kernel = exact_matmul(self.fmt.qtype, n_in, n_out, self.vnni)
        else:
            kernel = int8_matmul(self.fmt.qtype, n_in, n_out, row_bytes, self.interleaved)
        out = Tensor.placeholder([rows.shape[0], n_out], "float32")
        y = op.tensor_ir_op(kernel, "gguf_int8_matmul", [rows, self.q_data], out)
        return op.reshape(y, (*x.shape[:-1], n_out))  # [b, s, n_out]

    def _float_matmul(self, x: Tensor) -> Tensor:
        fmt, n_in, n_out, dtype = self.fmt, self.in_features, self.out_features, self.dtype

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

        return op.tensor_expr_op(matmul, "gguf_matmul", [x, self.q_data])


class GGUFExperts(PackedModule):
    """A mixture's [experts, out, in] weights as GGUF blocks, [experts * out] rows, multiplied by grouped rows
    (model_defs/moe.py) with each weight decoded to float32 as the kernel reads it."""

    def __init__(self, fmt: BlockFormat, num_experts: int, in_features: int, out_features: int):
        self.fmt, self.num_experts, self.in_features, self.out_features = fmt, num_experts, in_features, out_features
        self.q_data = nn.Parameter((num_experts * out_features, fmt.row_bytes(in_features)), "uint8")
        self.run = 16  # columns decoded per (vector) inner loop: 16 consecutive columns share a block's bytes

    def to(self, dtype: str | None = None) -> None:
        return

    def pack_weight(self, weight: np.ndarray) -> dict[str, np.ndarray]:
        return {"q_data": weight.view(np.uint8).reshape(self.num_experts * self.out_features, -1)}

    def packed_params(self) -> list[nn.Parameter]:
        return [self.q_data]

    def weight_at(
        self, params: list, e: tirx.PrimExpr, o: tirx.PrimExpr, j: tirx.PrimExpr, i: tirx.PrimExpr, dtype: str
    ):
        return self.fmt.weight_at(params[0], e * self.out_features + o, j, i).astype(dtype)

    def forward(self, x: Tensor, starts: Tensor, order: Tensor, gather_k: int) -> Tensor:
        return grouped_matmul(self, x, starts, order, gather_k)


class GGUFEmbedding(PackedModule):
    def __init__(self, fmt: BlockFormat, num: int, dim: int, dtype: str):
        self.fmt, self.num, self.dim, self.dtype = fmt, num, dim, dtype
        self.q_data = nn.Parameter((num, fmt.row_bytes(dim)), "uint8")

    def to(self, dtype: str | None = None) -> None:
        return

    def pack_weight(self, weight: np.ndarray) -> dict[str, np.ndarray]:
        return {"q_data": weight.view(np.uint8).reshape(self.num, -1)}

    def forward(self, ids: Tensor) -> Tensor:
        fmt, dim, dtype = self.fmt, self.dim, self.dtype

        def gather(idx: te.Tensor, data: te.Tensor) -> te.Tensor:
            return te.compute(
                (*idx.shape, dim),
                lambda *i: fmt.weight_at_col(data, idx[i[:-1]], i[-1]).astype(dtype),
                name="gguf_embed",
            )

        return op.tensor_expr_op(gather, "gguf_embed", [ids, self.q_data])


class GGUFNativeScheme(QuantScheme):
    """Each matrix in the block type it has in the GGUF file; float tensors in `dtype`.

    `activations`: "q8" multiplies 8-bit activations with the integer weight codes where the target CPU can
    (llama.cpp's arithmetic, and its speed); "f32" decodes weights to float (the exact dequantized model).
    With "q8" on an AVX2 CPU and only block types whose llama.cpp kernels quant_schemes/gguf_exact.py
    reproduces, the model computes llama.cpp's very numbers (`llamacpp_numerics`): its matmuls, RMSNorm,
    SwiGLU, GeGLU, RoPE, float16 K/V and attention, operation for operation; `llamacpp=False` ("gguf-fast") keeps
    mlcc's own summation order instead (a chunk's words summed as integers, one float scaling per chunk:
    faster prefill).
    """

    def __init__(
        self,
        tensor_types: dict[str, GGMLQuantizationType],
        dtype: str = "float32",
        activations: str = "q8",
        llamacpp: bool = True,
        rows: dict[str, int] | None = None,
        elements: dict[str, int] | None = None,
    ):
        self.name = ("gguf" if llamacpp else "gguf-fast") if activations == "q8" else f"gguf-{activations}"
        self.dtype, self.tensor_types, self.activations = dtype, tensor_types, activations
        self.llamacpp = llamacpp  # reproduce llama.cpp's numbers where the block types allow
        self.rows = rows or {}  # each tensor's rows, where known
        self.elements = elements or {}  # each tensor's element count in the file, where known
        self.int8_activations = self.llamacpp_numerics = self.vnni = False  # decided per target by `prepare`
        counts: dict[str, int] = {}
        for t in tensor_types.values():
            counts[t.name] = counts.get(t.name, 0) + 1
        self.description = "native GGUF blocks: " + ", ".join(f"{n} x{c}" for n, c in sorted(counts.items()))
        for t in set(tensor_types.values()) - FLOAT_TYPES:
            BlockFormat(t)  # a one-line error for any type we cannot run, before compiling anything

    def prepare(self, target: Target) -> None:
        from quant_schemes.gguf_exact import EXACT_TYPES
        from quant_schemes.gguf_int8 import has_avx2, has_vnni

        self.int8_activations = self.activations == "q8" and has_avx2(target)
        self.vnni = self.int8_activations and has_vnni(target)
        matrices = set(self.tensor_types.values()) - FLOAT_TYPES
        # llama.cpp repacks Q4_K (the kernels mlcc follows) only in whole groups of 8 rows
        repacked = all(self.rows.get(name, 0) % 8 == 0 for name, t in self.tensor_types.items() if t == Q.Q4_K)
        self.llamacpp_numerics = (
            self.llamacpp and self.int8_activations and self.dtype == "float32" and matrices <= EXACT_TYPES and repacked
        )

    def describe(self) -> dict:
        types = sorted({t.name for t in self.tensor_types.values()})
        return {
            **super().describe(),
            "types": types,
            "activations": "q8" if self.int8_activations else "f32",
            "numerics": "llama.cpp" if self.llamacpp_numerics else "mlcc",
        }

    def bits_per_weight(self) -> float:
        """Bits per weight of the file's tensors as stored, norms and embeddings included (llama.cpp's BPW)."""
        from gguf import GGML_QUANT_SIZES

        stored = sum(
            n * 8 * GGML_QUANT_SIZES[self.tensor_types[name]][1] / GGML_QUANT_SIZES[self.tensor_types[name]][0]
            for name, n in self.elements.items()
        )
        return round(stored / sum(self.elements.values()), 2) if self.elements else 0.0

    def quantize_model(self, model: nn.Module) -> list[str]:
        from quant_schemes.gguf_exact import LlamaCppGeGLU, LlamaCppNeoxRope, LlamaCppRMSNorm, LlamaCppSwiGLU

        scheme = self

        class Swap(nn.Mutator):
            def visit_module(self, name: str, node: nn.Module) -> nn.Module:
                if scheme.llamacpp_numerics and isinstance(node, nn.RMSNorm) and node.bias is None:
                    return LlamaCppRMSNorm(int(node.weight.shape[0]), float(node.epsilon))
                if scheme.llamacpp_numerics and isinstance(node, SwiGLU):
                    return LlamaCppSwiGLU()
                if scheme.llamacpp_numerics and isinstance(node, GeGLU):
                    return LlamaCppGeGLU()
                if scheme.llamacpp_numerics and isinstance(node, NeoxRope):
                    return LlamaCppNeoxRope(node.theta, node.head_dim)
                qtype = scheme.tensor_types.get(f"{name}.weight")
                if qtype is None or qtype in FLOAT_TYPES:
                    return self.visit(name, node)
                fmt = BlockFormat(qtype)
                if isinstance(node, nn.Linear):
                    bias = node.bias is not None
                    return GGUFLinear(
                        fmt,
                        node.in_features,
                        node.out_features,
                        bias,
                        scheme.dtype,
                        scheme.int8_activations,
                        scheme.llamacpp_numerics,
                        scheme.vnni,
                    )
                if isinstance(node, nn.Embedding):
                    num, dim = (int(d) for d in node.weight.shape)
                    return GGUFEmbedding(fmt, num, dim, scheme.dtype)
                if isinstance(node, ExpertLinear):
                    return GGUFExperts(fmt, node.num_experts, node.in_features, node.out_features)
                return self.visit(name, node)

        model.to(self.dtype)
        Swap().visit("", model)
        return []
