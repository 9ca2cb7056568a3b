"""ggml's float functions as it computes them, for kernels that must give llama.cpp's numbers bit for bit: its
vector exp (`ggml_v_expf`), its float16 GeLU table, and the RoPE angle cache (libm's powf, cosf and sinf).

The float operations use explicit fused multiply-adds where ggml has them and plain ones elsewhere (TVM's LLVM
backend would contract a * b + c on its own where ggml rounds twice).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from tir_kernels.simd import fma, splat


def v_expf(x: tirx.PrimExpr, flush_tiny: bool = False) -> tirx.PrimExpr:
    """ggml's AVX2 `ggml_v_expf`, lane by lane (its special cases for |n| > 126 included). `flush_tiny`: 0
    where e^x < 2^-126 (n < -126), for callers whose results do not change with it (ggml's is a subnormal or 0
    there, each made by a microcode assist: ~150 cycles a lane on Intel)."""
    lanes = x.ty.dtype.lanes
    f32 = "float32" if lanes == 1 else f"float32x{lanes}"
    u32 = "uint32" if lanes == 1 else f"uint32x{lanes}"

    def c(value: str) -> tirx.PrimExpr:
        return splat(float.fromhex(value), lanes)

    def bits(v):
        return tirx.reinterpret(u32, v)

    def flt(v):
        return tirx.reinterpret(f32, v)

    def u(value: int):
        return splat(value, lanes, "uint32")

    r = c("0x1.8p23")
    z = fma(x, c("0x1.715476p+0"), r)
    n = z - r
    b = fma(-n, c("0x1.7f7d1cp-20"), fma(-n, c("0x1.62e4p-1"), x))
    e = bits(z) << u(23)
    k = flt(e + bits(splat(1.0, lanes)))
    sq = b * b
    j = fma(
        fma(fma(c("0x1.0e4020p-7"), b, c("0x1.573e2ep-5")), sq, fma(c("0x1.555e66p-3"), b, c("0x1.fffdb6p-2"))),
        sq,
        c("0x1.ffffecp-1") * b,
    )
    # ggml: g = n <= 0 ? 0x82000000 : 0, s1 = g + 0x7f000000, s2 = e - g (as bits, wrapping), written as
    # selects: TVM's simplifier folds g + 0x7f000000 without wrapping to 32 bits. ggml takes this path only when
    # a lane needs it; here every lane computes it, so the lanes that do not take 1.0 instead: s2 = e is a
    # subnormal float for small n, and each multiply on one costs a microcode assist (SwiGLU of 8192 values,
    # Intel Xeon, 1 thread: 28.6 -> 3.3 us).
    negative = n <= splat(0.0, lanes)
    big = tirx.abs(n) > splat(126.0, lanes)
    one = splat(1.0, lanes)
    # flushed: the tiny lanes' arms computed on ones, so that no operation of theirs yields a subnormal
    rare = tirx.And(big, tirx.Not(negative)) if flush_tiny else big
    s1 = tirx.Select(rare, tirx.Select(negative, splat(2.0**-125, lanes), splat(2.0**127, lanes)), one)
    s2 = tirx.Select(rare, tirx.Select(negative, flt(e + u(0x7E000000)), flt(e)), one)
    huge = tirx.abs(n) > splat(192.0, lanes)
    value = tirx.Select(huge, s1 * s1, tirx.Select(big, fma(s2, j, s2) * s1, fma(k, j, k)))
    return tirx.Select(tirx.And(big, negative), splat(0.0, lanes), value) if flush_tiny else value


# ggml_gelu_f32's constants (GELU_COEF_A, SQRT_2_OVER_PI) as float32.
GELU_COEF_A = float(np.float32(0.044715))
SQRT_2_OVER_PI = float(np.float32(0.79788456080286535587989211986876))


@functools.cache
def _libm() -> ctypes.CDLL:
    """The C library's float functions ggml calls (tanhf, powf), for values computed at compile time."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.tanhf.restype, libm.tanhf.argtypes = ctypes.c_float, [ctypes.c_float]
    libm.powf.restype, libm.powf.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]
    return libm


@functools.cache
def gelu_f16_table() -> np.ndarray:
    """ggml_table_gelu_f16 as float16 [65536]: ggml_gelu_f32 (1 + a*x*x fused, as GCC compiles it; libm's
    tanhf) of every float16, rounded to float16 (NaNs as F16C makes them: no payload, the sign kept)."""
    libm = _libm()
    f32 = np.float32
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(f32)
    with np.errstate(all="ignore"):
        inner = ((f32(GELU_COEF_A) * x).astype(np.float64) * x + 1.0).astype(f32)  # exact product, one rounding
        arg = ((f32(SQRT_2_OVER_PI) * x).astype(f32) * inner).astype(f32)
        tanh = np.array([libm.tanhf(float(a)) for a in arg], f32)
        out = ((f32(0.5) * x).astype(f32) * (f32(1) + tanh).astype(f32)).astype(f32)
    bits = out.astype(np.float16).view(np.uint16)
    bits = np.where(np.isnan(out), np.where(np.signbit(out), 0xFE00, 0x7E00), bits).astype(np.uint16)
    return bits.view(np.float16)


def ggml_theta_scale(theta: float, rotary_dim: int) -> float:
    """powf(theta, -2.0f / n_dims) from the C library, as ggml computes it."""
    exponent = float(np.float32(-2.0) / np.float32(rotary_dim))
    return float(_libm().powf(theta, exponent))


@T.macro
def ggml_rope_cache(cos, sin, angle, position, half: int, theta_scale: float, freq_scale: float = 1.0):
    """ggml_rope_cache_init into local buffers cos, sin [half]: theta = position, then theta *= theta_scale
    pair by pair (angle [1]: its running value), libm's cosf and sinf of freq_scale * theta (rope_yarn without
    extrapolation; freq_scale = 1.0f / the linear scaling factor)."""
    angle[0] = T.Cast("float32", position)
    for i in range(half):
        if freq_scale == 1.0:
            cos[i] = T.cos(angle[0])
            sin[i] = T.sin(angle[0])
        else:
            cos[i] = T.cos(angle[0] * T.float32(freq_scale))
            sin[i] = T.sin(angle[0] * T.float32(freq_scale))
        angle[0] = angle[0] * T.float32(theta_scale)
