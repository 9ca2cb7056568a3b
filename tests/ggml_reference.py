"""ggml's CPU arithmetic (AVX2 build) in numpy, float operation for float operation: the reference for
quant_schemes/gguf_exact.py. Checked bit for bit against llama.cpp's own intermediate tensors (the
eval callback of llama-cpp-python 0.3.36) for SmolLM2's first layer.

A fused multiply-add is computed in float64 and rounded once to float32 (exact for these operands but for
a double-rounding tie, which random tests do not meet)."""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

f32, f64 = np.float32, np.float64
LIBM = ctypes.CDLL(ctypes.util.find_library("m"))
for _name in ("expf", "cosf", "sinf"):
    getattr(LIBM, _name).restype = ctypes.c_float
    getattr(LIBM, _name).argtypes = [ctypes.c_float]
LIBM.powf.restype, LIBM.powf.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]


def fma(a, b, c) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return (f64(a) * f64(b) + f64(c)).astype(f32)


def hsum8(a: np.ndarray) -> np.ndarray:
    """hsum_float_8 over the last axis (8 lanes)."""
    r = [(a[..., k + 4] + a[..., k]).astype(f32) for k in range(4)]
    return ((r[0] + r[2]).astype(f32) + (r[1] + r[3]).astype(f32)).astype(f32)


def f16(x) -> np.ndarray:
    return np.asarray(x, f32).astype(np.float16).astype(f32)


def quantize_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q8_0/q8_1 of [t, n]: per 32 columns d (float16), int8 codes, s = d * sum(q) (float16)."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(f32)
    amax = np.abs(blocks).max(-1)
    d = (amax / f32(127)).astype(f32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, f32(127) / amax, f32(0)).astype(f32)
    q = np.rint((blocks * inv[..., None]).astype(f32)).astype(np.int64)
    return f16(d), q, f16((d * q.sum(-1).astype(f32)).astype(f32))


def _blocks(raw: np.ndarray, n_in: int, size: int) -> np.ndarray:
    return raw.reshape(raw.shape[0], n_in // 32, size)


def _half(b: np.ndarray, at: int) -> np.ndarray:
    return b[..., at : at + 2].copy().view(np.float16)[..., 0].astype(f32)


def vec_dot(raw: np.ndarray, qtype: str, x: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_q4_1_q8_1 / ggml_vec_dot_q8_0_q8_0 / ..._q5_0_q8_0 (= tinyBLAS's order) of every row of `raw`
    (GGUF blocks, [rows, bytes]) with every token of x [t, n_in] -> [t, rows]."""
    n_in = x.shape[1]
    if qtype == "Q5_0":  # its codes as Q8_0's; the arithmetic is the same
        b = _blocks(raw, n_in, 22)
        high = np.unpackbits(b[..., 2:6], axis=-1, bitorder="little").astype(np.int64)
        low = np.concatenate([b[..., 6:] & 15, b[..., 6:] >> 4], -1).astype(np.int64)
        d, m = _half(b, 0), None
        w = (low | (high << 4)) - 16
    elif qtype == "Q4_1":
        b = _blocks(raw, n_in, 20)
        d, m = _half(b, 0), _half(b, 2)
        w = np.concatenate([b[..., 4:] & 15, b[..., 4:] >> 4], -1).astype(np.int64)
    else:
        b = _blocks(raw, n_in, 34)
        d, m = _half(b, 0), None
        w = b[..., 2:].copy().view(np.int8).astype(np.int64)
    xd, xq, xs = quantize_q8(x)
    lanes = np.einsum("rbjk,tbjk->trbj", w.reshape(*w.shape[:2], 8, 4), xq.reshape(*xq.shape[:2], 8, 4)).astype(f32)
    acc = np.zeros((x.shape[0], raw.shape[0], 8), f32)
    mins = np.zeros((x.shape[0], raw.shape[0]), f32)
    for blk in range(n_in // 32):
        scale = (d[None, :, blk] * xd[:, None, blk]).astype(f32)
        acc = fma(scale[..., None], lanes[:, :, blk], acc)
        if m is not None:
            mins = fma(m[None, :, blk], xs[:, None, blk], mins)
    return (hsum8(acc) + mins).astype(f32)


def quantize_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q8_K of [t, n]: per 256 columns d = 1 / (127 / max|x|) and the int8 codes [t, S, 256]."""
    blocks = x.reshape(x.shape[0], -1, 256).astype(f32)
    amax = np.abs(blocks).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, f32(127) / amax, f32(0)).astype(f32)
        d = np.where(amax != 0, f32(1) / inv, f32(0)).astype(f32)
    return d, np.rint((blocks * inv[..., None]).astype(f32)).astype(np.int64)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7 of Q4_K's 12 scale bytes [..., 12] -> scales, mins [..., 8]."""
    s = s.astype(np.int64)
    sc = [s[..., j] & 63 for j in range(4)] + [(s[..., j + 4] & 15) | ((s[..., j - 4] >> 6) << 4) for j in range(4, 8)]
    mn = [s[..., j + 4] & 63 for j in range(4)] + [(s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4) for j in range(4, 8)]
    return np.stack(sc, -1), np.stack(mn, -1)


def vec_dot_k(raw: np.ndarray, qtype: str, x: np.ndarray) -> np.ndarray:
    """Q4_K as ggml_gemv/gemm_q4_K_8x8_q8_K, Q6_K as ggml_vec_dot_q6_K_q8_K (or ggml's tiled matmul from 8
    tokens on), of every row of `raw` (GGUF
    blocks [rows, bytes]) with every token of x [t, n_in] -> [t, rows]; decoded after dequantize_row_q*_K."""
    rows, n_in = raw.shape[0], x.shape[1]
    xd, xq = quantize_q8_k(x)  # [t, S], [t, S, 256]
    if qtype == "Q4_K":
        b = raw.reshape(rows, n_in // 256, 144)
        d, dmin = _half(b, 0), _half(b, 2)
        sc, mn = _k_scales(b[..., 4:16])
        qs = b[..., 16:].reshape(rows, -1, 4, 32).astype(np.int64)
        w = np.stack([qs & 15, qs >> 4], axis=-2).reshape(rows, -1, 8, 32)  # [r, S, sub-block, 32]
        dots = np.einsum("rsjk,tsjk->trsj", w, xq.reshape(*xq.shape[:2], 8, 32))
        # [t, r, S, pair]: the GEMM (tokens in fours) scales each pair of sub-blocks, the GEMV each super-block
        isum = (dots * sc[None]).reshape(*dots.shape[:3], 4, 2).sum(-1)
        imin = (xq.reshape(*xq.shape[:2], 8, 32).sum(-1)[:, None] * mn[None]).reshape(*dots.shape[:3], 4, 2).sum(-1)
        tiled = np.arange(x.shape[0]) < x.shape[0] - x.shape[0] % 4
        isum[~tiled, :, :, 0], imin[~tiled, :, :, 0] = isum[~tiled].sum(-1), imin[~tiled].sum(-1)
        acc = np.zeros((x.shape[0], rows), f32)
        mins = np.zeros((x.shape[0], rows), f32)
        for s in range(n_in // 256):
            scale, min_scale = (
                (d[None, :, s] * xd[:, None, s]).astype(f32),
                (dmin[None, :, s] * xd[:, None, s]).astype(f32),
            )
            for p in range(4):
                new_acc = fma(isum[..., s, p].astype(f32), scale, acc)
                new_mins = fma(imin[..., s, p].astype(f32), min_scale, mins)
                keep = tiled[:, None] | (p == 0)
                acc, mins = np.where(keep, new_acc, acc), np.where(keep, new_mins, mins)
        return (acc - mins).astype(f32)
    b = raw.reshape(rows, n_in // 256, 210)
    d = b[..., 208:210].copy().view(np.float16)[..., 0].astype(f32)
    sc = b[..., 192:208].copy().view(np.int8).astype(np.int64)  # [r, S, 16]
    ql = b[..., 0:128].reshape(rows, -1, 2, 64).astype(np.int64)
    qh = b[..., 128:192].reshape(rows, -1, 2, 32).astype(np.int64)
    quarters = [(ql[..., :32] & 15) | ((qh & 3) << 4), (ql[..., 32:] & 15) | (((qh >> 2) & 3) << 4),
                (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4), (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4)]  # fmt: skip
    w = np.stack(quarters, axis=-2).reshape(rows, -1, 8, 8, 4)  # [r, S, chunk, lane, 4]: unsigned codes
    dots = np.einsum("rsglk,tsglk->trsgl", w, xq.reshape(*xq.shape[:2], 8, 8, 4))  # [t, r, S, chunk, lane]
    lane_scale = np.stack([sc[..., 0::2], sc[..., 1::2]], -1)  # [r, S, chunk, half]: sub-block 2 chunk + half
    main = (dots * lane_scale[None, :, :, :, np.arange(8) // 4]).sum(-2)  # [t, r, S, lane]
    bsums = xq.reshape(*xq.shape[:2], 16, 16).sum(-1)  # [t, S, 16]
    sub = 32 * (bsums[:, None, :, 0::2] * sc[None, :, :, 0::2] + bsums[:, None, :, 1::2] * sc[None, :, :, 1::2])
    if x.shape[0] >= 8:  # ggml's tiled matmul: per super-block (d_w * float(total)) * d_x, fused
        total = (main - sub).sum(-1).astype(f32)  # [t, r, S]
        out = np.zeros((x.shape[0], rows), f32)
        for s in range(n_in // 256):
            out = fma((d[None, :, s] * total[..., s]).astype(f32), xd[:, None, s], out)
        return out
    lanes = (main - sub).astype(f32)
    acc = np.zeros((x.shape[0], rows, 8), f32)
    for s in range(n_in // 256):
        acc = fma((xd[:, None, s] * d[None, :, s]).astype(f32)[..., None], lanes[:, :, s], acc)
    return hsum8(acc)


def v_expf(x: np.ndarray) -> np.ndarray:
    """ggml_v_expf (AVX2), lane by lane."""
    x = np.asarray(x, f32)
    c = lambda h: f32(float.fromhex(h))  # noqa: E731
    r = c("0x1.8p23")
    z = fma(x, c("0x1.715476p+0"), r)
    n = (z - r).astype(f32)
    b = fma(-n, c("0x1.7f7d1cp-20"), fma(-n, c("0x1.62e4p-1"), x))
    e = z.view(np.uint32) << np.uint32(23)
    k = (e + np.array(1, f32).view(np.uint32)).view(f32)
    u = (b * b).astype(f32)
    j = fma(fma(fma(c("0x1.0e4020p-7"), b, c("0x1.573e2ep-5")), u, fma(c("0x1.555e66p-3"), b, c("0x1.fffdb6p-2"))),
            u, (c("0x1.ffffecp-1") * b).astype(f32))  # fmt: skip
    g = np.where(n <= 0, np.uint32(0x82000000), np.uint32(0))
    s1 = (g + np.uint32(0x7F000000)).view(f32)
    s2 = (e - g).view(f32)
    with np.errstate(over="ignore", under="ignore"):
        special = np.where(np.abs(n) > 192, s1 * s1, fma(s2, j, s2) * s1)
    return np.where(np.abs(n) > 126, special, fma(k, j, k)).astype(f32)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    total = np.zeros(x.shape[0], f64)
    for i in range(x.shape[1]):
        total = total + (x[:, i] * x[:, i]).astype(f32).astype(f64)
    mean = (total / x.shape[1]).astype(f32)
    scale = (f32(1) / np.sqrt((mean + f32(eps)).astype(f32))).astype(f32)
    return ((x * scale[:, None]).astype(f32) * w).astype(f32)


def swiglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """ggml_vec_swiglu_f32 per row: vector silu for whole 8s, libm expf for the rest."""
    n8 = g.shape[-1] // 8 * 8
    out = np.empty_like(g)
    head = g[:, :n8]
    out[:, :n8] = (head / (f32(1) + v_expf((f32(0) - head).astype(f32))).astype(f32)).astype(f32) * u[:, :n8]
    for idx in np.ndindex(g.shape[0], g.shape[1] - n8):
        r, i = idx[0], n8 + idx[1]
        silu = f32(g[r, i] / f32(f32(1) + f32(LIBM.expf(float(-g[r, i])))))
        out[r, i] = f32(silu * u[r, i])
    return out.astype(f32)


def geglu(g: np.ndarray, u: np.ndarray, table: np.ndarray) -> np.ndarray:
    """ggml_vec_geglu_f32 (GGML_GELU_FP16): `table` (ggml_table_gelu_f16) at g rounded to float16, times u."""
    with np.errstate(over="ignore"):
        gelu = table.astype(f32)[g.astype(np.float16).view(np.uint16)]
    return np.where(g <= -10, f32(0), np.where(g >= 10, g * u, gelu * u)).astype(f32)


def rope_neox(x: np.ndarray, positions: np.ndarray, base: float, freq_scale: float = 1.0) -> np.ndarray:
    """ggml_rope_ext, NEOX mode, of x [n, heads, dim]: angles position * theta_scale^i by repeated float
    multiplication, each times freq_scale (rope_yarn without extrapolation: linear scaling), libm's cosf and
    sinf, the rotation as GCC contracts it."""
    n, _, dim = x.shape
    half = dim // 2
    theta_scale = f32(LIBM.powf(base, float(f32(-2.0) / f32(dim))))
    cos, sin = np.empty((n, half), f32), np.empty((n, half), f32)
    for t in range(n):
        theta = f32(positions[t])
        for i in range(half):
            angle = float(f32(f32(freq_scale) * theta))
            cos[t, i], sin[t, i] = LIBM.cosf(angle), LIBM.sinf(angle)
            theta = f32(theta * theta_scale)
    x0, x1, c, s = x[..., :half], x[..., half:], cos[:, None], sin[:, None]
    return np.concatenate([fma(x0, c, -(x1 * s).astype(f32)), fma(x0, s, (x1 * c).astype(f32))], -1)


def f16_dot_reduce(acc: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_f16's reduction (GGML_F32x8_REDUCE) of its 4 accumulators of 8 lanes, acc [..., 4, 8]."""
    x = ((acc[..., 0, :] + acc[..., 2, :]).astype(f32) + (acc[..., 1, :] + acc[..., 3, :]).astype(f32)).astype(f32)
    t = [(x[..., k] + x[..., k + 4]).astype(f32) for k in range(4)]
    return ((t[0] + t[1]).astype(f32) + (t[2] + t[3]).astype(f32)).astype(f32)


def vec_dot_f16(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_f16 (AVX2) of the rows x [..., n] with y [n], float16 values both: element i of each
    32 into accumulator (i % 32) // 8, lane i % 8; the last n % 32 added in float64 after the reduction."""
    n = x.shape[-1]
    acc = np.zeros((*x.shape[:-1], 4, 8), f32)
    for step in range(n // 32):
        cols = slice(32 * step, 32 * step + 32)
        acc = fma(x[..., cols].reshape(*x.shape[:-1], 4, 8), y[cols].reshape(4, 8), acc)
    total = f16_dot_reduce(acc).astype(f64)
    for i in range(n // 32 * 32, n):
        total = total + (x[..., i] * y[i]).astype(f32).astype(f64)
    return total.astype(f32)


def decode_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """One query head's attention as llama.cpp computes a one-token batch without flash attention: q [d] (float32),
    k and v [keys, d] (float16 values). K.q with q rounded to float16 (ggml_vec_dot_f16), soft_max_ext: scaled
    scores, ggml_v_expf 8 at a time summed in float64 (hsum_float_8), scaled by the float inverse of the sum,
    rounded to float16; then each output element the ggml_vec_dot_f16 of V's column (V is transposed in the
    cache) with the probabilities, over the keys padded with zeros to a multiple of 32 (llama.cpp pads the
    cache view, its masked probabilities 0)."""
    scores = (vec_dot_f16(k, f16(q)) * f32(scale)).astype(f32)
    padded = -(-scores.size // 32) * 32
    exps = np.zeros(padded, f32)
    exps[: scores.size] = v_expf((scores - scores.max()).astype(f32))
    total = f64(0)
    for chunk in exps.reshape(-1, 8):
        total = total + f64(hsum8(chunk))
    probs = f16(exps * f32(1.0 / total))
    values = np.zeros((padded, v.shape[1]), f32)
    values[: v.shape[0]] = v
    return vec_dot_f16(values.T, probs)
