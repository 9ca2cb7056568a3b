"""Small builders of vector TIR expressions, shared by the hand-written CPU kernels (the GGUF int8 matmuls
and the attention kernels in compiler/)."""

from __future__ import annotations

from tvm import tirx


def tree_sum(terms: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """The sum of `terms` as a balanced tree: independent chains the CPU can overlap."""
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def concat(parts: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """The lanes of `parts` side by side in one vector (a single part as it is)."""
    if len(parts) == 1:
        return parts[0]
    lanes = sum(p.ty.dtype.lanes for p in parts)
    return tirx.Shuffle(parts, [tirx.IntImm("int32", i) for i in range(lanes)])


def row_sums(rows: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """[sum(rows[0]), ..., sum(rows[n - 1])] for n vectors of n lanes (n a power of two): pairs of vectors are
    halved by adding their even and odd lanes until one is left, which holds the sums in order
    (3n - 3 vector ops for n = 8, instead of n horizontal sums)."""
    lanes = rows[0].ty.dtype.lanes
    even = [tirx.IntImm("int32", i) for i in range(0, 2 * lanes, 2)]
    odd = [tirx.IntImm("int32", i) for i in range(1, 2 * lanes, 2)]
    while len(rows) > 1:
        rows = [tirx.Shuffle([a, b], even) + tirx.Shuffle([a, b], odd) for a, b in zip(rows[0::2], rows[1::2])]
    return rows[0]
