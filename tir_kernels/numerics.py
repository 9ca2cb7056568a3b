"""Whose order of float operations a build computes in: one setting per build, decided once by the compiler
(compiler/numerics.py), recorded in the manifest, and read by every kernel that has two."""

from __future__ import annotations

from enum import Enum


class Numerics(str, Enum):
    """MLCC: mlcc's own order, chosen for speed (sums regrouped, multiply-adds contracted by LLVM).
    LLAMACPP: llama.cpp's CPU backend op for op (its matmul kernels, RMSNorm, SwiGLU, GeGLU, RoPE, float16 K/V
    and attention, strict float flags), so a GGUF model's logits are llama.cpp's bit for bit."""

    MLCC = "mlcc"
    LLAMACPP = "llama.cpp"  # the manifest's quant["numerics"] value since it was first written
