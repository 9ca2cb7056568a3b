"""GGUF rows reordered for the int8 matmuls, once, when weights are converted: the same bits, with 8 rows'
blocks side by side so that one 32-byte load holds one word (4 columns) of 8 rows (row r in lane r).

Two orders: the InterleavedLayout (mlcc's kernels, tir_kernels/matmul_int8.py) and the GroupLayout / SuperLayout
(llama.cpp's order, tir_kernels/matmul_llamacpp.py; the 4- and 5-bit types share the InterleavedLayout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from tvm import tirx

from tir_kernels.gguf_blocks import BLOCKS, CHUNK, SUPER_BLOCK, decode_q4_k, decode_q6_k, f16, u8
from tir_kernels.simd import LANES

Q = GGMLQuantizationType
LANE_ROWS = LANES  # rows side by side in one vector, one a float32 lane


@dataclass(frozen=True)
class InterleavedLayout:
    """Byte offsets in the interleaved form of a group of 8 rows' blocks of one chunk (8 * block bytes):
    the rows' float16 scales (and mins), a high-bit plane (5-bit types) and the codes in word order: the 4
    columns 4m..4m+3 of each row side by side, so one 32-byte load is a `pmaddubsw` operand for 8 rows."""

    block_bytes: int
    minimum: int | None  # the rows' float16 mins (Q4_1/Q5_1)
    high: int | None  # 32 bytes: bit m of byte 4r + k is the high bit of row r's column 4m + k
    codes: int  # 128 bytes: for word w in 0..3, the 8 rows' qs bytes 4w..4w+3 (low nibbles: word w, high: w + 4)
    zero: int  # subtracted from codes without a min

    @property
    def group_bytes(self) -> int:
        return LANE_ROWS * self.block_bytes


INTERLEAVED = {
    Q.Q4_0: InterleavedLayout(18, None, None, 16, 8),
    Q.Q4_1: InterleavedLayout(20, 16, None, 32, 0),
    Q.Q5_0: InterleavedLayout(22, None, 16, 48, 16),
    Q.Q5_1: InterleavedLayout(24, 16, 32, 64, 0),
}


@dataclass(frozen=True)
class GroupLayout:
    """Byte offsets in a chunk of 8 rows stored side by side (8 * block bytes): the rows' float16 scales, their
    float16 mins (Q4_1, Q5_1), the 5-bit types' high-bit plane (byte 4r + k: bit m is column 4m + k of row r),
    then 8 words of 32 bytes, word m holding the 8 rows' columns 4m..4m+3 (the 4- and 5-bit types packed two
    words to a byte, word m and m + 4: their InterleavedLayout)."""

    block_bytes: int
    minimum: int | None
    codes: int
    high: int | None = None

    @property
    def group_bytes(self) -> int:
        return LANE_ROWS * self.block_bytes


GROUP_LAYOUTS = {
    Q.Q4_0: GroupLayout(18, None, 16),
    Q.Q4_1: GroupLayout(20, 16, 32),
    Q.Q5_0: GroupLayout(22, None, 48, high=16),
    Q.Q5_1: GroupLayout(24, 16, 64, high=32),
    Q.Q8_0: GroupLayout(34, None, 16),
}


@dataclass(frozen=True)
class SuperLayout:
    """Byte offsets in one super-block of 8 rows stored side by side: the rows' float16 d (and dmin), their
    sub-block scales (and mins) as [sub-block][row], then per 32-column chunk the 4-bit codes of words m and
    m + 4 (columns 4m..4m+3 of 8 rows, [row][column]) as low and high nibbles of 32 bytes, and for Q6_K per
    chunk bits 4-5 of words m, m + 2, m + 4, m + 6 as the 2-bit fields of 32 bytes. The GGUF bits, reordered."""

    minimum: int | None
    sub_scales: int
    sub_mins: int | None
    low: int
    high: int | None
    size: int
    sub_blocks: int
    block_bytes: int  # the GGUF block


SUPER_LAYOUTS = {
    Q.Q4_K: SuperLayout(
        minimum=16, sub_scales=32, sub_mins=96, low=160, high=None, size=1184, sub_blocks=8, block_bytes=144
    ),  # fmt: skip
    Q.Q6_K: SuperLayout(
        minimum=None, sub_scales=16, sub_mins=None, low=144, high=1168, size=1680, sub_blocks=16, block_bytes=210
    ),  # fmt: skip
}


def row_group_blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    """GGUF rows [n_out, row_bytes] as blocks [ceil(n_out / 8), chunks, 8, block_bytes] (rows past n_out zero)."""
    n_out, row_bytes = raw.shape
    groups = -(-n_out // LANE_ROWS)
    padded = np.zeros((groups * LANE_ROWS, row_bytes), np.uint8)
    padded[:n_out] = raw
    return padded.reshape(groups, LANE_ROWS, row_bytes // block_bytes, block_bytes).transpose(0, 2, 1, 3)


def interleave_rows(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """GGUF rows [n_out, row_bytes] -> [ceil(n_out / 8), chunks * 8 * block_bytes] in the InterleavedLayout
    (rows past n_out are zero)."""
    block = BLOCKS[qtype]
    blocks = row_group_blocks(raw, block.size)
    groups, chunks = blocks.shape[:2]
    parts = [blocks[..., block.field("d")]]
    if block.has("m"):
        parts.append(blocks[..., block.field("m")])
    if block.has("qh"):
        bits = np.unpackbits(blocks[..., block.field("qh")], axis=-1, bitorder="little")  # [G, C, 8, 32]: column i
        words = bits.reshape(groups, chunks, LANE_ROWS, 8, 4).transpose(0, 1, 2, 4, 3)  # [.., r, k, m]
        parts.append(np.packbits(words, axis=-1, bitorder="little"))
    qs = blocks[..., block.field("qs")].reshape(groups, chunks, LANE_ROWS, 4, 4).transpose(0, 1, 3, 2, 4)
    parts.append(qs)
    flat = [part.reshape(groups, chunks, -1) for part in parts]
    return np.ascontiguousarray(np.concatenate(flat, axis=-1).reshape(groups, -1))


def group_bytes(qtype: GGMLQuantizationType, n_in: int) -> int:
    """Bytes of one group of 8 rows of `n_in` columns as `group_rows` stores them."""
    if qtype in SUPER_LAYOUTS:
        return n_in // SUPER_BLOCK * SUPER_LAYOUTS[qtype].size
    return n_in // CHUNK * GROUP_LAYOUTS[qtype].group_bytes


def group_rows(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """GGUF rows [n_out, row_bytes] -> [ceil(n_out / 8), group_bytes] in the GroupLayout or SuperLayout (rows
    past n_out are zero)."""
    if qtype in SUPER_LAYOUTS:
        return _group_rows_k(raw, qtype)
    if qtype in INTERLEAVED:
        return interleave_rows(raw, qtype)
    block = BLOCKS[qtype]
    blocks = row_group_blocks(raw, block.size)  # [G, C, 8, bb]
    groups, chunks = blocks.shape[:2]
    words = blocks[..., block.field("qs")].reshape(groups, chunks, LANE_ROWS, 8, 4).transpose(0, 1, 3, 2, 4)
    parts = [blocks[..., block.field("d")].reshape(groups, chunks, -1), words.reshape(groups, chunks, -1)]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(groups, -1))


def _group_rows_k(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """GGUF rows [n_out, row_bytes] -> [ceil(n_out / 8), super-blocks * size] in the SuperLayout."""
    lay = SUPER_LAYOUTS[qtype]
    blocks = row_group_blocks(raw, lay.block_bytes)  # [G, S, 8, bb]
    groups, supers = blocks.shape[:2]
    if qtype == Q.Q4_K:
        d, dmin, scales, mins, codes = decode_q4_k(blocks)
        heads = [d, dmin, scales.swapaxes(-1, -2), mins.swapaxes(-1, -2)]
    else:
        d, scales, codes = decode_q6_k(blocks)
        heads = [d, scales.swapaxes(-1, -2)]
    words = codes.reshape(groups, supers, LANE_ROWS, 8, 8, 4).transpose(0, 1, 3, 4, 2, 5)  # [G, S, c, m, r, k]
    low = words & 15
    parts = [*heads, low[:, :, :, :4] | (low[:, :, :, 4:] << 4)]  # [G, S, c, 4, r, k]
    if lay.high is not None:
        high = (words >> 4).reshape(groups, supers, 8, 4, 2, LANE_ROWS, 4)  # m = 2 q + m2: [.., q, m2, r, k]
        parts.append(sum(high[:, :, :, q] << (2 * q) for q in range(4)).astype(np.uint8))  # [G, S, c, 2, r, k]
    flat = np.concatenate([p.astype(np.uint8).reshape(groups, supers, -1) for p in parts], axis=-1)
    assert flat.shape[-1] == lay.size
    return np.ascontiguousarray(flat.reshape(groups, -1))


def super_weight_at(qtype: GGMLQuantizationType, data, row: tirx.PrimExpr, col: tirx.PrimExpr) -> tirx.PrimExpr:
    """Float32 TIR expression of weight (row, col) of rows stored by `_group_rows_k` ([groups, bytes], a te
    tensor), with the operations of the plain rows' decoder (tir_kernels/gguf_blocks.py): the same values."""
    lay = SUPER_LAYOUTS[qtype]
    group, r = row // LANE_ROWS, row % LANE_ROWS
    base, u = col // SUPER_BLOCK * lay.size, col % SUPER_BLOCK
    c, m, word = u // CHUNK, u % CHUNK // 4, 4 * r + u % 4  # chunk, word (4 columns) in it, byte in 8 rows' word
    low = (u8(data, group, base + lay.low + 128 * c + 32 * (m % 4) + word) >> (4 * (m // 4)).astype("uint32")) & (
        tirx.const(15, "uint32")
    )
    d = f16(data, group, base + 2 * r)
    if qtype == Q.Q4_K:
        scale = u8(data, group, base + lay.sub_scales + 8 * c + r).astype("float32")
        minimum = u8(data, group, base + lay.sub_mins + 8 * c + r).astype("float32")
        return d * scale * low.astype("float32") - f16(data, group, base + lay.minimum + 2 * r) * minimum
    high = (u8(data, group, base + lay.high + 64 * c + 32 * (m % 2) + word) >> (2 * (m // 2)).astype("uint32")) & (
        tirx.const(3, "uint32")
    )
    code = (low | (high << tirx.const(4, "uint32"))).astype("float32") - 32.0
    scale = data[group, base + lay.sub_scales + 8 * (u // 16) + r].astype("int8").astype("float32")
    return d * scale * code
