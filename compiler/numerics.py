"""What a build's numerics (tir_kernels/numerics.py) change beyond its quantized matmuls: the model's RMSNorm,
SwiGLU, GeGLU and model-applied RoPE modules (llama.cpp's kernels for LLAMACPP) and the float flags the target
compiles with (strict: no reassociation, no contraction LLVM chooses itself). The KV cache's RoPE and attention
kernels take the setting in compiler/cpu_attention.py; the quantization scheme decides it (`prepare`)."""

from __future__ import annotations

from tvm.relax.frontend import nn

from compiler.targets import TargetSpec, strict_float
from model_defs.common import GeGLU, NeoxRope, SwiGLU
from tir_kernels.norms_activations import LlamaCppGeGLU, LlamaCppRMSNorm, LlamaCppSwiGLU
from tir_kernels.numerics import Numerics
from tir_kernels.rope import LlamaCppNeoxRope


def numerics_target(spec: TargetSpec, numerics: Numerics) -> TargetSpec:
    """The target a build in `numerics` compiles for: strict float flags for llama.cpp's numbers."""
    return strict_float(spec) if numerics == Numerics.LLAMACPP else spec


def use_numerics(model: nn.Module, numerics: Numerics, spec: TargetSpec, dtype: str) -> None:
    """Swap the model's norms, gated activations and RoPE for the kernels of `numerics` (in place). A CPU build
    with float32 activations in mlcc's order takes ggml's SwiGLU too, vectorized and in parallel, where TVM's own
    silu calls libm's expf one element at a time on the calling thread (1B Llama Q4_0 decode at 2 threads: ~1.7%
    of the main thread's time)."""
    llamacpp = numerics == Numerics.LLAMACPP
    if not llamacpp and not (spec.device == "cpu" and dtype == "float32"):
        return

    class Swap(nn.Mutator):
        def visit_module(self, name: str, node: nn.Module) -> nn.Module:
            if isinstance(node, SwiGLU):
                return LlamaCppSwiGLU()
            if not llamacpp:
                return self.visit(name, node)
            if isinstance(node, nn.RMSNorm) and node.bias is None:
                return LlamaCppRMSNorm(int(node.weight.shape[0]), float(node.epsilon))
            if isinstance(node, GeGLU):
                return LlamaCppGeGLU()
            if isinstance(node, NeoxRope):
                return LlamaCppNeoxRope(node.theta, node.head_dim, node.freq_scale)
            return self.visit(name, node)

    Swap().visit("", model)
