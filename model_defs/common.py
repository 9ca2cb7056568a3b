"""Pieces every architecture shares: the attention layout the KV cache needs, HF config helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from artifacts.errors import MlccError

SUPPORTED_ROPE_TYPES = ("default", "llama3", "yarn", "longrope")


@dataclass
class AttentionLayout:
    """What the compiler needs to build the paged KV cache for a model."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    rotary_dim: int | None = None
    # Per-layer sliding window size in tokens, None for full attention.
    layer_windows: list[int | None] = field(default_factory=list)
    # True when the model rotates q and k itself (e.g. a RoPE base per layer); the cache then applies none.
    model_applies_rope: bool = False

    @property
    def sliding_window(self) -> int | None:
        windows = {w for w in self.layer_windows if w}
        if len(windows) > 1:
            raise MlccError(f"layers use different sliding windows {sorted(windows)}; not supported yet")
        return windows.pop() if windows else None


class SwiGLU(nn.Module):
    """silu(gate) * up, a module so that a quantization scheme can swap in its own arithmetic."""

    def forward(self, gate: Tensor, up: Tensor) -> Tensor:
        return op.silu(gate) * up


class GeGLU(nn.Module):
    """gelu_tanh(gate) * up, a module so that a quantization scheme can swap in its own arithmetic."""

    def forward(self, gate: Tensor, up: Tensor) -> Tensor:
        return op.gelu(gate, approximate="tanh") * up


class NeoxRope(nn.Module):
    """Rotate-half RoPE applied by the model itself (e.g. a base per layer), in float32; a module so that a
    quantization scheme can swap in its own arithmetic."""

    def __init__(self, theta: float, head_dim: int):
        self.theta, self.head_dim = theta, head_dim

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x [b, s, h, d] at the token positions [b*s]."""
        theta = self.theta

        def compute(xt: te.Tensor, pos: te.Tensor) -> te.Tensor:
            _, seq, _, dim = xt.shape
            half = dim // 2

            def angle(t, i):
                exponent = i.astype("float32") * 2.0 / tirx.const(int(dim), "float32")
                return pos[t].astype("float32") / tirx.power(tirx.const(theta, "float32"), exponent)

            # cos and sin once per (token, frequency), not once per head and element: they dominate otherwise.
            cos = te.compute((pos.shape[0], half), lambda t, i: tirx.cos(angle(t, i)), name="rope_cos")
            sin = te.compute((pos.shape[0], half), lambda t, i: tirx.sin(angle(t, i)), name="rope_sin")

            def body(b, s, h, d):
                t = b * seq + s
                rotated = tirx.if_then_else(d < half, -xt[b, s, h, d + half], xt[b, s, h, d - half])
                value = (
                    xt[b, s, h, d].astype("float32") * cos[t, d % half] + rotated.astype("float32") * sin[t, d % half]
                )
                return value.astype(xt.dtype)

            return te.compute(xt.shape, body, name="rope")

        return op.tensor_expr_op(compute, "rope", [x, positions])


def hf_get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """First present key of an HF config (names differ between architectures and releases)."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def hf_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """RoPE base and scaling from an HF config, in both the old (rope_theta + rope_scaling) and the
    transformers 5 (rope_parameters) spelling. Returns (theta, scaling dict or {})."""
    params = cfg.get("rope_parameters") or {}
    scaling = dict(cfg.get("rope_scaling") or params)
    theta = float(hf_get(cfg, "rope_theta", default=params.get("rope_theta", 10000.0)))
    scaling.pop("rope_theta", None)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise MlccError(f"unsupported RoPE scaling {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if kind == "default":
        return theta, {}
    scaling["rope_type"] = kind
    return theta, scaling
