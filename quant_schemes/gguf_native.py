"""GGUF block quantization run natively: the GGUF bytes are the parameters, decoded inside the kernels.

Each weight keeps llama.cpp's block layout (one row of blocks per output row, or 8 rows' blocks side by side
for the int8 kernels: tir_kernels/repack.py), so nothing is re-quantized and the compiled matmul decodes exactly the
weights llama.cpp decodes. Supported block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K (tir_kernels/
gguf_blocks.py); F32/F16/BF16 tensors are converted to the model's float type.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.target import Target

from quant_schemes.base import PackedModule, QuantScheme
from tir_kernels.experts import ExpertLinear, grouped_matmul, grouped_rows_kernel
from tir_kernels.gguf_blocks import FLOAT_TYPES, BlockFormat
from tir_kernels.matmul_amx import amx_chunk_sum_rows, amx_super_rows
from tir_kernels.matmul_float import decoded_gather, decoded_matmul, grouped_gather, super_gather
from tir_kernels.matmul_int8 import int8_rows
from tir_kernels.matmul_llamacpp import CHUNK_SUM_OFFSETS, EXACT_TYPES, chunk_sum_rows, llamacpp_rows
from tir_kernels.numerics import Numerics
from tir_kernels.repack import INTERLEAVED, LANE_ROWS, SUPER_LAYOUTS, group_rows, interleave_rows
from tir_kernels.simd import AskAhead, asks_ahead, has_amx, has_avx2, has_vnni, vector_registers

Q = GGMLQuantizationType
# Types whose llama.cpp-order kernels also serve mlcc's order: faster than `int8_rows` with or without VNNI
# (1 thread, 128 tokens, x86-64-v3 / AVX-512 VNNI, GMAC/s: Q8_0 640x2048 47 vs 28 / 59 vs 33, Q4_K 2048x640
# 69 vs 62 / 73 vs 54, Q6_K 2048x640 59 vs 32 / 71 vs 49; one token 2-3x).
FAST_EXACT_TYPES = {Q.Q8_0, Q.Q4_K, Q.Q6_K}


class Int8Rows:
    """How an int8-activation kernel holds one [out, in] matrix of GGUF blocks: the kernel's body (shared by a
    dense layer and each expert of a mixture), the packed array's shape, and the repacking of the file's rows."""

    def __init__(
        self,
        fmt: BlockFormat,
        in_features: int,
        out_features: int,
        numerics: Numerics,
        vnni: bool,
        vector_registers: int = 16,
        amx: bool = False,
        ask_ahead: AskAhead = AskAhead.NONE,
    ):
        self.fmt, self.in_features, self.out_features, self.numerics = fmt, in_features, out_features, numerics
        qtype = fmt.qtype
        # The kernel: llama.cpp's order where asked; else (mlcc's order, any will do) the fastest measured:
        # chunk sums on VNNI (their prefill on AMX where the CPU has it: the same bits), llama.cpp's kernels for
        # Q8_0 and the K-quants (faster than int8_rows with or without VNNI), int8_rows for the rest. Their
        # weights: 8 rows side by side, the same bits reordered.
        if numerics == Numerics.LLAMACPP:
            self.rows = llamacpp_rows(qtype, in_features, out_features, vnni, vector_registers, ask_ahead=ask_ahead)
            self.repack = group_rows if qtype in EXACT_TYPES else None
        elif vnni and qtype in CHUNK_SUM_OFFSETS:
            chunk_sums = amx_chunk_sum_rows if amx else chunk_sum_rows
            self.rows, self.repack = chunk_sums(qtype, in_features, out_features, ask_ahead), group_rows
        elif amx and qtype in SUPER_LAYOUTS:  # one of llama.cpp's orders for every token: AMX takes its sums
            self.rows = amx_super_rows(qtype, in_features, out_features, vector_registers, ask_ahead)
            self.repack = group_rows
        elif qtype in FAST_EXACT_TYPES:
            self.rows = llamacpp_rows(qtype, in_features, out_features, vnni, vector_registers, ask_ahead=ask_ahead)
            self.repack = group_rows
        else:
            interleaved = qtype in INTERLEAVED
            self.rows = int8_rows(qtype, in_features, out_features, fmt.row_bytes(in_features), interleaved)
            self.repack = interleave_rows if interleaved else None
        self.shape = self.rows.data_shape

    def pack(self, rows: np.ndarray) -> np.ndarray:
        """The file's [out, row bytes] blocks in the kernel's order."""
        return self.repack(rows, self.fmt.qtype) if self.repack else rows


class GGUFLinear(PackedModule):
    """y = x @ W.T (+ b) with W held as GGUF blocks and decoded in the reduction; float32 accumulation.

    With `int8_activations` (x86 CPUs with AVX2), x is quantized to 8 bits per 32 columns and multiplied in
    integers, as llama.cpp does (tir_kernels/matmul_int8.py, or tir_kernels/matmul_llamacpp.py in llama.cpp's
    order); otherwise the weights are decoded to float.
    """

    def __init__(
        self,
        fmt: BlockFormat,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: str,
        int8_activations: bool,
        numerics: Numerics = Numerics.MLCC,
        vnni: bool = False,
        vector_registers: int = 16,
        amx: bool = False,
        ask_ahead: AskAhead = AskAhead.NONE,
    ):
        self.fmt, self.in_features, self.out_features, self.dtype = fmt, in_features, out_features, dtype
        # llama.cpp's own order of operations is that of its int8 kernels; `vnni`: the target has `vpdpbusd`
        self.int8 = None
        if int8_activations and dtype == "float32":
            self.int8 = Int8Rows(fmt, in_features, out_features, numerics, vnni, vector_registers, amx, ask_ahead)
        shape = self.int8.shape if self.int8 else (out_features, fmt.row_bytes(in_features))
        self.q_data = nn.Parameter(shape, "uint8")
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def to(self, dtype: str | None = None) -> None:
        return

    def pack_weight(self, weight: np.ndarray) -> dict[str, np.ndarray]:
        rows = weight.view(np.uint8).reshape(self.out_features, -1)
        return {"q_data": self.int8.pack(rows) if self.int8 else rows}

    def forward(self, x: Tensor) -> Tensor:
        y = self._int8_matmul(x) if self.int8 else self._float_matmul(x)
        return y + self.bias if self.bias is not None else y

    def _int8_matmul(self, x: Tensor) -> Tensor:
        rows = op.reshape(x, (-1, self.in_features))  # [b*s, n_in]
        out = Tensor.placeholder([rows.shape[0], self.out_features], "float32")
        y = op.tensor_ir_op(self.int8.rows.kernel, "gguf_int8_matmul", [rows, self.q_data], out)
        return op.reshape(y, (*x.shape[:-1], self.out_features))  # [b, s, n_out]

    def _float_matmul(self, x: Tensor) -> Tensor:
        matmul = decoded_matmul(self.fmt, self.in_features, self.out_features, self.dtype)
        return op.tensor_expr_op(matmul, "gguf_matmul", [x, self.q_data])


class GGUFExperts(PackedModule):
    """A mixture's [experts, out, in] weights as GGUF blocks, multiplied by grouped rows (tir_kernels/experts.py).

    With `int8_activations` each expert's blocks are held as a dense layer's int8 kernel holds them, one expert
    after another, and each expert's rows go through that kernel (the dense layers' integer arithmetic and
    numerics); otherwise each weight is decoded to float32 as the kernel reads it."""

    def __init__(
        self,
        fmt: BlockFormat,
        num_experts: int,
        in_features: int,
        out_features: int,
        int8_activations: bool = False,
        numerics: Numerics = Numerics.MLCC,
        vnni: bool = False,
        vector_registers: int = 16,
        amx: bool = False,
        ask_ahead: AskAhead = AskAhead.NONE,
    ):
        self.fmt, self.num_experts, self.in_features, self.out_features = fmt, num_experts, in_features, out_features
        self.int8 = None
        if int8_activations:
            self.int8 = Int8Rows(fmt, in_features, out_features, numerics, vnni, vector_registers, amx, ask_ahead)
        rows, width = self.int8.shape if self.int8 else (out_features, fmt.row_bytes(in_features))
        self.q_data = nn.Parameter((num_experts * rows, width), "uint8")
        self.run = 16  # float decode: columns decoded per (vector) inner loop, 16 consecutive share a block's bytes

    def to(self, dtype: str | None = None) -> None:
        return

    def pack_weight(self, weight: np.ndarray) -> dict[str, np.ndarray]:
        rows = weight.view(np.uint8).reshape(self.num_experts, self.out_features, -1)
        if self.int8:
            rows = np.stack([self.int8.pack(expert) for expert in rows])
        return {"q_data": rows.reshape(self.q_data.shape[0], -1)}

    def packed_params(self) -> list[nn.Parameter]:
        return [self.q_data]

    def weight_at(
        self, params: list, e: tirx.PrimExpr, o: tirx.PrimExpr, j: tirx.PrimExpr, i: tirx.PrimExpr, dtype: str
    ):
        return self.fmt.weight_at(params[0], e * self.out_features + o, j, i).astype(dtype)

    def forward(self, x: Tensor, starts: Tensor, order: Tensor, gather_k: int) -> Tensor:
        if not self.int8:
            return grouped_matmul(self, x, starts, order, gather_k)
        kernel = grouped_rows_kernel(self.num_experts, self.int8.rows, gather_k)
        out = Tensor.placeholder([order.shape[0], self.out_features], "float32")
        return op.tensor_ir_op(kernel, "moe_int8_matmul", [x, starts, order, self.q_data], out)


def byte_order(pack: Callable[[np.ndarray], np.ndarray], row_bytes: int) -> np.ndarray | None:
    """Where `pack` puts each byte of 8 rows in their group, [8, row bytes], if it only moves bytes (Q4_0, Q4_1,
    Q8_0 in llama.cpp's order); None where it re-encodes them (the 5-bit types' high bits, the K-quants)."""
    positions = np.arange(LANE_ROWS * row_bytes, dtype=np.int64).reshape(LANE_ROWS, row_bytes)
    planes = [pack(((positions >> (8 * k)) & 255).astype(np.uint8)).reshape(-1).astype(np.int64) for k in range(3)]
    source = planes[0] | planes[1] << 8 | planes[2] << 16  # the position each packed byte came from
    if source.size != positions.size or not np.array_equal(np.sort(source), positions.ravel()):
        return None
    sample = np.random.default_rng(0).integers(0, 256, positions.shape, dtype=np.uint8)
    if not np.array_equal(pack(sample).reshape(-1), sample.reshape(-1)[source]):
        return None
    order = np.empty_like(source)
    order[source] = np.arange(source.size)
    return order.reshape(LANE_ROWS, row_bytes).astype(np.int32)


class GGUFEmbedding(PackedModule):
    """Row gather of GGUF blocks, each row decoded as it is read. `head`: a tied output head's int8 layout, which
    the table is then stored in, so that the two are the same bytes and the artifact holds them once
    (compiler/compile.py): rows are read through the byte order where the layout only moves bytes, from the
    super-block layout for the K-quants; other layouts keep the file's rows."""

    def __init__(self, fmt: BlockFormat, num: int, dim: int, dtype: str, head: Int8Rows | None = None):
        self.fmt, self.num, self.dim, self.dtype = fmt, num, dim, dtype
        repack = head.repack if head is not None else None
        self.order = byte_order(head.pack, fmt.row_bytes(dim)) if repack and fmt.qtype not in SUPER_LAYOUTS else None
        self.super_blocks = repack is group_rows and fmt.qtype in SUPER_LAYOUTS
        self.head = head if self.order is not None or self.super_blocks else None
        self.q_data = nn.Parameter(self.head.shape if self.head else (num, fmt.row_bytes(dim)), "uint8")

    def to(self, dtype: str | None = None) -> None:
        return

    def pack_weight(self, weight: np.ndarray) -> dict[str, np.ndarray]:
        rows = weight.view(np.uint8).reshape(self.num, -1)
        return {"q_data": self.head.pack(rows) if self.head else rows}

    def forward(self, ids: Tensor) -> Tensor:
        if self.super_blocks:
            gather = super_gather(self.fmt.qtype, self.dim, self.dtype)
            return op.tensor_expr_op(gather, "gguf_embed", [ids, self.q_data])
        if self.order is not None:
            gather = grouped_gather(self.fmt, self.dim, self.dtype)
            return op.tensor_expr_op(gather, "gguf_embed", [ids, self.q_data, Tensor.from_const(self.order)])
        return op.tensor_expr_op(decoded_gather(self.fmt, self.dim, self.dtype), "gguf_embed", [ids, self.q_data])


class GGUFNativeScheme(QuantScheme):
    """Each matrix in the block type it has in the GGUF file; float tensors in `dtype`.

    `activations`: "q8" multiplies 8-bit activations with the integer weight codes where the target CPU can
    (llama.cpp's arithmetic, and its speed); "f32" decodes weights to float (the exact dequantized model).
    `numerics`: the numerics asked for. LLAMACPP ("gguf") gives llama.cpp's very numbers where the target and
    the block types allow it ("q8" on an AVX2 CPU, only block types whose llama.cpp kernels tir_kernels/
    matmul_llamacpp.py reproduces), mlcc's own order elsewhere; MLCC ("gguf-fast") keeps mlcc's own summation
    order (a chunk's words summed as integers, one float scaling per chunk: faster prefill). `prepare` decides
    the build's `numerics` for its target.
    """

    def __init__(
        self,
        tensor_types: dict[str, GGMLQuantizationType],
        dtype: str = "float32",
        activations: str = "q8",
        numerics: Numerics = Numerics.LLAMACPP,
        rows: dict[str, int] | None = None,
        elements: dict[str, int] | None = None,
        tied_head: bool = False,
    ):
        wanted = Numerics(numerics)
        q8_name = "gguf" if wanted == Numerics.LLAMACPP else "gguf-fast"
        self.name = q8_name if activations == "q8" else f"gguf-{activations}"
        self.dtype, self.tensor_types, self.activations = dtype, tensor_types, activations
        self.wanted_numerics = wanted  # llama.cpp's numbers where the block types allow, or mlcc's order
        self.rows = rows or {}  # each tensor's rows, where known
        self.elements = elements or {}  # each tensor's element count in the file, where known
        self.tied_head = tied_head  # the output head is the embedding (the file has no output.weight)
        self.int8_activations = self.vnni = self.amx = False  # decided per target by `prepare`
        self.vector_registers = 16
        self.ask_ahead = AskAhead.NONE
        counts: dict[str, int] = {}
        for t in tensor_types.values():
            counts[t.name] = counts.get(t.name, 0) + 1
        self.description = "native GGUF blocks: " + ", ".join(f"{n} x{c}" for n, c in sorted(counts.items()))
        for t in set(tensor_types.values()) - FLOAT_TYPES:
            BlockFormat(t)  # a one-line error for any type we cannot run, before compiling anything

    def prepare(self, target: Target) -> None:
        self.int8_activations = self.activations == "q8" and has_avx2(target)
        self.vnni = self.int8_activations and has_vnni(target)
        self.amx = self.vnni and has_amx(target)
        self.vector_registers = vector_registers(target)
        self.ask_ahead = asks_ahead(target)
        matrices = set(self.tensor_types.values()) - FLOAT_TYPES
        # llama.cpp repacks Q4_K (the kernels mlcc follows) only in whole groups of 8 rows
        repacked = all(self.rows.get(name, 0) % 8 == 0 for name, t in self.tensor_types.items() if t == Q.Q4_K)
        exact = self.int8_activations and self.dtype == "float32" and matrices <= EXACT_TYPES and repacked
        self.numerics = Numerics.LLAMACPP if self.wanted_numerics == Numerics.LLAMACPP and exact else Numerics.MLCC

    def describe(self) -> dict:
        types = sorted({t.name for t in self.tensor_types.values()})
        return {
            **super().describe(),
            "types": types,
            "activations": "q8" if self.int8_activations else "f32",
            "numerics": self.numerics.value,
        }

    def bits_per_weight(self) -> float:
        """Bits per weight of the file's tensors as stored, norms and embeddings included (llama.cpp's BPW)."""
        stored = sum(
            n * 8 * GGML_QUANT_SIZES[self.tensor_types[name]][1] / GGML_QUANT_SIZES[self.tensor_types[name]][0]
            for name, n in self.elements.items()
        )
        return round(stored / sum(self.elements.values()), 2) if self.elements else 0.0

    def tied_head_rows(self, name: str, fmt: BlockFormat, num: int, dim: int) -> Int8Rows | None:
        """The int8 layout of the output head that embedding `name` is tied to, if it has one."""
        if not (self.tied_head and name == "token_embd" and self.int8_activations and self.dtype == "float32"):
            return None
        if self.tensor_types.get("output.weight") != fmt.qtype:
            return None
        args = (self.numerics, self.vnni, self.vector_registers, self.amx, self.ask_ahead)
        return Int8Rows(fmt, dim, num, *args)

    def quantize_model(self, model: nn.Module) -> list[str]:
        scheme = self

        class Swap(nn.Mutator):
            def visit_module(self, name: str, node: nn.Module) -> nn.Module:
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
                        scheme.numerics,
                        scheme.vnni,
                        scheme.vector_registers,
                        scheme.amx,
                        scheme.ask_ahead,
                    )
                if isinstance(node, nn.Embedding):
                    num, dim = (int(d) for d in node.weight.shape)
                    return GGUFEmbedding(fmt, num, dim, scheme.dtype, scheme.tied_head_rows(name, fmt, num, dim))
                if isinstance(node, ExpertLinear):
                    return GGUFExperts(
                        fmt,
                        node.num_experts,
                        node.in_features,
                        node.out_features,
                        scheme.int8_activations,
                        scheme.numerics,
                        scheme.vnni,
                        scheme.vector_registers,
                        scheme.amx,
                        scheme.ask_ahead,
                    )
                return self.visit(name, node)

        model.to(self.dtype)
        Swap().visit("", model)
        return []
