"""GGUF's block layouts, written once: each block type's fields and byte offsets (ggml's block_* structs,
checked against gguf.GGML_QUANT_SIZES), and the decoders made from them: a scalar TIR decoder of one weight
(any kernel's inner loop), a vector TIR decoder of a 32-column chunk (the int8 matmuls) and numpy decoders of
K-quant blocks (repacking).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from tvm import te, tirx

from artifacts.errors import MlccError
from tir_kernels.simd import bcast, concat, load, vec_const

Q = GGMLQuantizationType
FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16}
CHUNK = 32  # columns of a Q4_0..Q8_0 block, and of one int8 dot-product chunk of every type
SUPER_BLOCK = 256  # columns of a K-quant super-block


@dataclass(frozen=True)
class BlockLayout:
    """One block of `columns` weights: its fields in order, name -> bytes (ggml's names: d the float16 scale,
    m/dmin the float16 min, qh high bits, qs (Q6_K: ql) codes, scales the K-quants' sub-block scales)."""

    qtype: GGMLQuantizationType
    columns: int
    fields: tuple[tuple[str, int], ...]

    def __post_init__(self):
        if (self.columns, self.size) != tuple(GGML_QUANT_SIZES[self.qtype]):
            raise AssertionError(f"{self.qtype.name}: layout {self.columns}/{self.size} is not GGUF's")

    @property
    def size(self) -> int:
        return sum(n for _, n in self.fields)

    def __getitem__(self, name: str) -> int:
        """The byte offset of field `name` in the block."""
        offset = 0
        for field, n in self.fields:
            if field == name:
                return offset
            offset += n
        raise KeyError(name)

    def has(self, name: str) -> bool:
        return any(field == name for field, _ in self.fields)

    def field(self, name: str) -> slice:
        """Field `name` as a slice of a block's bytes (numpy)."""
        start = self[name]
        return slice(start, start + dict(self.fields)[name])


def _layout(qtype: GGMLQuantizationType, columns: int, **fields: int) -> BlockLayout:
    return BlockLayout(qtype, columns, tuple(fields.items()))


BLOCKS: dict[GGMLQuantizationType, BlockLayout] = {
    Q.Q4_0: _layout(Q.Q4_0, CHUNK, d=2, qs=16),
    Q.Q4_1: _layout(Q.Q4_1, CHUNK, d=2, m=2, qs=16),
    Q.Q5_0: _layout(Q.Q5_0, CHUNK, d=2, qh=4, qs=16),
    Q.Q5_1: _layout(Q.Q5_1, CHUNK, d=2, m=2, qh=4, qs=16),
    Q.Q8_0: _layout(Q.Q8_0, CHUNK, d=2, qs=32),
    Q.Q4_K: _layout(Q.Q4_K, SUPER_BLOCK, d=2, m=2, scales=12, qs=128),
    Q.Q5_K: _layout(Q.Q5_K, SUPER_BLOCK, d=2, m=2, scales=12, qh=32, qs=128),
    Q.Q6_K: _layout(Q.Q6_K, SUPER_BLOCK, qs=128, qh=64, scales=16, d=2),
}
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = (BLOCKS[t] for t in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0))
Q4_K, Q5_K, Q6_K = (BLOCKS[t] for t in (Q.Q4_K, Q.Q5_K, Q.Q6_K))


# ---- scalar TIR: bytes of a [rows, bytes] buffer -----------------------------------------------------------
def u8(data: te.Tensor, row: tirx.PrimExpr, byte: tirx.PrimExpr) -> tirx.PrimExpr:
    return data[row, byte].astype("uint32")


def f16(data: te.Tensor, row: tirx.PrimExpr, byte: tirx.PrimExpr) -> tirx.PrimExpr:
    """A little-endian float16 stored at `byte`, as float32."""
    bits = u8(data, row, byte) | (u8(data, row, byte + 1) << tirx.const(8, "uint32"))
    return tirx.reinterpret("float16", bits.astype("uint16")).astype("float32")


def _i8(d, r, byte):
    return d[r, byte].astype("int8").astype("float32")


def _nibble(data: te.Tensor, row: tirx.PrimExpr, base: tirx.PrimExpr, half, i) -> tirx.PrimExpr:
    """Element half*16 + i of a 32-element block whose 16 nibble bytes start at `base`: the low nibbles
    hold elements 0..15, the high nibbles 16..31."""
    shift = (half * 4).astype("uint32")
    return (u8(data, row, base + i) >> shift) & tirx.const(0xF, "uint32")


def _high_bit(data: te.Tensor, row: tirx.PrimExpr, base: tirx.PrimExpr, half, i) -> tirx.PrimExpr:
    """Bit half*16 + i of the 32-bit little-endian `qh` field of Q5 blocks, moved to bit 4."""
    byte = u8(data, row, base + half * 2 + i // 8)
    return ((byte >> (i % 8).astype("uint32")) & tirx.const(1, "uint32")) << tirx.const(4, "uint32")


def k_scale_min(d, r, o, sub):
    """6-bit scale and min of sub-block `sub` (0..7) from the 12 packed bytes at o (ggml get_scale_min_k4)."""
    low = sub < 4
    s_lo, m_lo = u8(d, r, o + sub % 4) & 63, u8(d, r, o + sub % 4 + 4) & 63
    hi = u8(d, r, o + sub % 4 + 8)
    s_hi = (hi & 0xF) | ((u8(d, r, o + sub % 4) >> 6) << 4)
    m_hi = (hi >> 4) | ((u8(d, r, o + sub % 4 + 4) >> 6) << 4)
    return tirx.if_then_else(low, s_lo, s_hi).astype("float32"), tirx.if_then_else(low, m_lo, m_hi).astype("float32")


# Decoders of the weight at column 16 * t + i of row r, as float32. Every type keeps 16 consecutive columns
# in consecutive bytes (or nibbles of them), so the inner loop over i reads contiguous memory and vectorizes.
# The layouts follow ggml's dequantize_row_* functions.
def _q4_0(d, r, t, i):
    o = (t // 2) * Q4_0.size
    return f16(d, r, o + Q4_0["d"]) * (_nibble(d, r, o + Q4_0["qs"], t % 2, i).astype("float32") - 8.0)


def _q4_1(d, r, t, i):
    o = (t // 2) * Q4_1.size
    q = _nibble(d, r, o + Q4_1["qs"], t % 2, i)
    return f16(d, r, o + Q4_1["d"]) * q.astype("float32") + f16(d, r, o + Q4_1["m"])


def _q5_0(d, r, t, i):
    o = (t // 2) * Q5_0.size
    q = _nibble(d, r, o + Q5_0["qs"], t % 2, i) | _high_bit(d, r, o + Q5_0["qh"], t % 2, i)
    return f16(d, r, o + Q5_0["d"]) * (q.astype("float32") - 16.0)


def _q5_1(d, r, t, i):
    o = (t // 2) * Q5_1.size
    q = _nibble(d, r, o + Q5_1["qs"], t % 2, i) | _high_bit(d, r, o + Q5_1["qh"], t % 2, i)
    return f16(d, r, o + Q5_1["d"]) * q.astype("float32") + f16(d, r, o + Q5_1["m"])


def _q8_0(d, r, t, i):
    o = (t // 2) * Q8_0.size
    return f16(d, r, o + Q8_0["d"]) * _i8(d, r, o + Q8_0["qs"] + (t % 2) * 16 + i)


def _q4_k(d, r, t, i):
    """256-element super-block: d, dmin, 12 bytes of scales/mins, then 128 bytes: 4 chunks of 32 bytes, low
    nibbles for columns 0..31 of a 64-column chunk, high nibbles for 32..63."""
    o, u = (t // 16) * Q4_K.size, t % 16  # u: 16-column run within the super-block
    chunk, upper, half = u // 4, (u // 2) % 2, u % 2
    scale, minimum = k_scale_min(d, r, o + Q4_K["scales"], chunk * 2 + upper)
    q = (u8(d, r, o + Q4_K["qs"] + chunk * 32 + half * 16 + i) >> (upper * 4).astype("uint32")) & tirx.const(
        15, "uint32"
    )
    return f16(d, r, o + Q4_K["d"]) * scale * q.astype("float32") - f16(d, r, o + Q4_K["m"]) * minimum


def _q5_k(d, r, t, i):
    """Like Q4_K plus one high bit per column in 32 bytes after the scales (bit `sub` of qh[column % 32])."""
    o, u = (t // 16) * Q5_K.size, t % 16
    chunk, upper, half = u // 4, (u // 2) % 2, u % 2
    sub = chunk * 2 + upper
    scale, minimum = k_scale_min(d, r, o + Q5_K["scales"], sub)
    low = (u8(d, r, o + Q5_K["qs"] + chunk * 32 + half * 16 + i) >> (upper * 4).astype("uint32")) & tirx.const(
        15, "uint32"
    )
    high = ((u8(d, r, o + Q5_K["qh"] + half * 16 + i) >> sub.astype("uint32")) & tirx.const(1, "uint32")) << (
        tirx.const(4, "uint32")
    )
    return f16(d, r, o + Q5_K["d"]) * scale * (low | high).astype("float32") - f16(d, r, o + Q5_K["m"]) * minimum


def _q6_k(d, r, t, i):
    """256-element super-block: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d."""
    o, u = (t // 16) * Q6_K.size, t % 16
    n, g, lh = u // 8, (u // 2) % 4, u % 2  # 128-column half, quarter within it, 16-run within 32
    col = lh * 16 + i  # 0..31 within the quarter
    low = (u8(d, r, o + Q6_K["qs"] + n * 64 + (g % 2) * 32 + col) >> ((g // 2) * 4).astype("uint32")) & tirx.const(
        15, "uint32"
    )
    high = (u8(d, r, o + Q6_K["qh"] + n * 32 + col) >> (g * 2).astype("uint32")) & tirx.const(3, "uint32")
    q = (low | (high << tirx.const(4, "uint32"))).astype("float32") - 32.0
    return f16(d, r, o + Q6_K["d"]) * _i8(d, r, o + Q6_K["scales"] + n * 8 + lh + 2 * g) * q


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
    """A block type a kernel can decode: its sizes and the float32 value of one weight."""

    def __init__(self, qtype: GGMLQuantizationType):
        if qtype not in DECODERS:
            raise MlccError(f"GGUF quant type {qtype.name} is not supported yet; supported: {', '.join(SUPPORTED)}")
        self.qtype = qtype
        self.block, self.block_bytes = BLOCKS[qtype].columns, BLOCKS[qtype].size
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


# ---- vector TIR: a 32-column chunk's codes, for the integer dot products ------------------------------------
@dataclass
class Chunk:
    """The 32 codes of a chunk and how to scale their integer dot product with the activations:
    dot = scale * x_scale * sum_i (code_i - zero) * xq_i  [+ offset * x_sum]."""

    codes: tirx.PrimExpr  # uint8x32
    scale: tirx.PrimExpr  # float32
    zero: int = 0  # subtracted from the codes (then signed)
    offset: tirx.PrimExpr | None = None  # float32 factor of the chunk's activation sum
    sub_scales: tirx.PrimExpr | None = None  # int16x16: per-16-column integer scales (Q6_K)


def _nibbles(data, row, start) -> tirx.PrimExpr:
    """32 codes from 16 bytes: low nibbles are columns 0..15, high nibbles 16..31 (Q4_0/Q4_1/Q5_x)."""
    v = load(data, row, start, 16)
    return concat([v & bcast(15, "uint8", 16), v >> bcast(4, "uint8", 16)])


def _bits(data, row, start) -> tirx.PrimExpr:
    """Bit i of the little-endian 32-bit field at `start`, as 16 or 0, for columns i = 0..31 (Q5_0/Q5_1):
    byte i // 8 of the field spread to lane i, tested against bit i % 8."""
    field = load(data, row, start, 4)  # (a shuffle picks from its inputs' lanes, so give it 32 of them)
    spread = tirx.Shuffle([field] * 8, [tirx.IntImm("int32", i // 8) for i in range(32)])
    mask = vec_const([1 << (i % 8) for i in range(32)], "uint8")
    return tirx.Select((spread & mask) != bcast(0, "uint8", 32), bcast(16, "uint8", 32), bcast(0, "uint8", 32))


def _chunk_q4_0(d, r, c):
    o = c * Q4_0.size
    return Chunk(_nibbles(d, r, o + Q4_0["qs"]), f16(d, r, o + Q4_0["d"]), offset=-8 * f16(d, r, o + Q4_0["d"]))


def _chunk_q4_1(d, r, c):
    o = c * Q4_1.size
    return Chunk(_nibbles(d, r, o + Q4_1["qs"]), f16(d, r, o + Q4_1["d"]), offset=f16(d, r, o + Q4_1["m"]))


def _chunk_q5_0(d, r, c):
    o = c * Q5_0.size
    codes = _nibbles(d, r, o + Q5_0["qs"]) | _bits(d, r, o + Q5_0["qh"])
    return Chunk(codes, f16(d, r, o + Q5_0["d"]), offset=-16 * f16(d, r, o + Q5_0["d"]))


def _chunk_q5_1(d, r, c):
    o = c * Q5_1.size
    codes = _nibbles(d, r, o + Q5_1["qs"]) | _bits(d, r, o + Q5_1["qh"])
    return Chunk(codes, f16(d, r, o + Q5_1["d"]), offset=f16(d, r, o + Q5_1["m"]))


def _chunk_q8_0(d, r, c):
    o = c * Q8_0.size
    return Chunk(load(d, r, o + Q8_0["qs"], 32) ^ bcast(128, "uint8", 32), f16(d, r, o + Q8_0["d"]), zero=128)


def _int_scale(scale: tirx.PrimExpr) -> tirx.PrimExpr:
    """A K-quant sub-block's 6-bit scale as `pmaddwd`'s multiplier."""
    return tirx.Broadcast(scale.astype("int16"), 16)


def _chunk_q4_k(d, r, c):
    """Super-blocks of 256: chunk j (0..7) is the low (even j) or high nibbles of 32 bytes j // 2."""
    o, j = (c // 8) * Q4_K.size, c % 8
    scale, minimum = k_scale_min(d, r, o + Q4_K["scales"], j)
    shift = tirx.Broadcast(((j % 2) * 4).astype("uint8"), 32)
    codes = (load(d, r, o + Q4_K["qs"] + (j // 2) * 32, 32) >> shift) & bcast(15, "uint8", 32)
    offset = -f16(d, r, o + Q4_K["m"]) * minimum
    return Chunk(codes, f16(d, r, o + Q4_K["d"]), offset=offset, sub_scales=_int_scale(scale))


def _chunk_q5_k(d, r, c):
    """Like Q4_K, plus bit j of each of the 32 `qh` bytes as bit 4."""
    o, j = (c // 8) * Q5_K.size, c % 8
    scale, minimum = k_scale_min(d, r, o + Q5_K["scales"], j)
    shift = tirx.Broadcast(((j % 2) * 4).astype("uint8"), 32)
    low = (load(d, r, o + Q5_K["qs"] + (j // 2) * 32, 32) >> shift) & bcast(15, "uint8", 32)
    high_bit = (load(d, r, o + Q5_K["qh"], 32) >> tirx.Broadcast(j.astype("uint8"), 32)) & bcast(1, "uint8", 32)
    high = high_bit << bcast(4, "uint8", 32)
    offset = -f16(d, r, o + Q5_K["m"]) * minimum
    return Chunk(low | high, f16(d, r, o + Q5_K["d"]), offset=offset, sub_scales=_int_scale(scale))


def _chunk_q6_k(d, r, c):
    """Super-blocks of 256: chunk j = 4n + g takes low nibbles from ql (half n, quarter g) and two high bits
    from qh; each 16 columns have an int8 scale."""
    o, j = (c // 8) * Q6_K.size, c % 8
    n, g = j // 4, j % 4
    shift = tirx.Broadcast(((g // 2) * 4).astype("uint8"), 32)
    low = (load(d, r, o + Q6_K["qs"] + n * 64 + (g % 2) * 32, 32) >> shift) & bcast(15, "uint8", 32)
    high_shift = tirx.Broadcast((g * 2).astype("uint8"), 32)
    high = (load(d, r, o + Q6_K["qh"] + n * 32, 32) >> high_shift) & bcast(3, "uint8", 32)
    s0 = d[r, o + Q6_K["scales"] + n * 8 + 2 * g].astype("int8").astype("int16")
    s1 = d[r, o + Q6_K["scales"] + n * 8 + 2 * g + 1].astype("int8").astype("int16")
    sub = tirx.Shuffle([tirx.Broadcast(s0, 8), tirx.Broadcast(s1, 8)], [tirx.IntImm("int32", i) for i in range(16)])
    return Chunk(low | (high << bcast(4, "uint8", 32)), f16(d, r, o + Q6_K["d"]), zero=32, sub_scales=sub)


CHUNK_DECODERS: dict[GGMLQuantizationType, Callable[..., Chunk]] = {
    Q.Q4_0: _chunk_q4_0,
    Q.Q4_1: _chunk_q4_1,
    Q.Q5_0: _chunk_q5_0,
    Q.Q5_1: _chunk_q5_1,
    Q.Q8_0: _chunk_q8_0,
    Q.Q4_K: _chunk_q4_k,
    Q.Q5_K: _chunk_q5_k,
    Q.Q6_K: _chunk_q6_k,
}


# ---- numpy: K-quant blocks' fields, for repacking ---------------------------------------------------------
def decode_q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K blocks [..., 144] -> d, dmin (float16 bytes [..., 2]), scales, mins [..., 8], codes [..., 256]."""
    s = blocks[..., Q4_K.field("scales")].astype(np.uint8)  # get_scale_min_k4
    scales = [s[..., j] & 63 for j in range(4)] + [
        (s[..., j + 4] & 15) | (s[..., j - 4] >> 6 << 4) for j in range(4, 8)
    ]
    mins = [s[..., j + 4] & 63 for j in range(4)] + [(s[..., j + 4] >> 4) | (s[..., j] >> 6 << 4) for j in range(4, 8)]
    qs = blocks[..., Q4_K.field("qs")].reshape(*blocks.shape[:-1], 4, 32)
    codes = np.stack([qs & 15, qs >> 4], axis=-2).reshape(*blocks.shape[:-1], SUPER_BLOCK)
    return blocks[..., Q4_K.field("d")], blocks[..., Q4_K.field("m")], np.stack(scales, -1), np.stack(mins, -1), codes


def decode_q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q6_K blocks [..., 210] -> d (float16 bytes [..., 2]), int8 scales [..., 16], codes 0..63 [..., 256]."""
    lead = blocks.shape[:-1]
    ql = blocks[..., Q6_K.field("qs")].reshape(*lead, 2, 64)
    qh = blocks[..., Q6_K.field("qh")].reshape(*lead, 2, 32)
    quarters = [
        (ql[..., :32] & 15) | ((qh & 3) << 4),
        (ql[..., 32:] & 15) | (((qh >> 2) & 3) << 4),
        (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4),
        (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4),
    ]
    codes = np.stack(quarters, axis=-2).reshape(*lead, SUPER_BLOCK)
    return blocks[..., Q6_K.field("d")], blocks[..., Q6_K.field("scales")], codes
