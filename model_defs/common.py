"""Pieces every architecture shares: the attention layout the KV cache needs, HF config helpers."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from artifacts.errors import MlccError

SUPPORTED_ROPE_TYPES = ("default", "llama3", "yarn", "longrope")
OPAQUE_PATTERN = 8  # TVM's OpPatternKind kOpaque: a kernel operator fusion leaves alone


@dataclass
class ModelConfig:
    """The fields every architecture's config has: compile and the runtime (the manifest's model_config) read them."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool = False
    sliding_window: int | None = None  # tokens, for the layers that slide
    context_window: int = 4096


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
    # Attention scores become cap * tanh(score / cap) before the softmax (Gemma 2); 0 for none.
    attn_softcap: float = 0.0
    # LongRoPE: a sequence longer than this is rotated with other factors, so prefill takes each token's
    # sequence length (see RopeTables.tables); 0 for none.
    rope_switch_length: int = 0

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
    quantization scheme can swap in its own arithmetic. `freq_scale` multiplies every angle (linear RoPE scaling,
    1 / factor, as llama.cpp's freq_scale). The angles' cos and sin are a table of their own (`tables`), computed
    once per call of the model for all the layers that share a base and applied by each (`rotate`)."""

    def __init__(self, theta: float, head_dim: int, freq_scale: float = 1.0):
        self.theta, self.head_dim, self.freq_scale = theta, head_dim, freq_scale

    def tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin [n, head_dim / 2] at the token positions [n]."""
        theta, freq_scale, dim = self.theta, self.freq_scale, self.head_dim

        def compute(pos: te.Tensor) -> list[te.Tensor]:
            def angle(t, i):
                exponent = i.astype("float32") * 2.0 / tirx.const(dim, "float32")
                angle = pos[t].astype("float32") / tirx.power(tirx.const(theta, "float32"), exponent)
                return angle * tirx.const(freq_scale, "float32") if freq_scale != 1.0 else angle

            shape = (pos.shape[0], dim // 2)
            cos = te.compute(shape, lambda t, i: tirx.cos(angle(t, i)), name="rope_cos")
            return [cos, te.compute(shape, lambda t, i: tirx.sin(angle(t, i)), name="rope_sin")]

        # a kernel of their own, not fused into each layer's rotation (see RopeTables.tables)
        cos, sin = op.tensor_expr_op(compute, "neox_rope_tables", [positions], attrs={"op_pattern": OPAQUE_PATTERN})
        return cos, sin

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [b, s, h, d] rotated by the tables [b*s, d / 2] of its tokens."""
        b, s, half = x.shape[0], x.shape[1], self.head_dim // 2
        return apply_rope(x, op.reshape(cos, (b, s, half)), op.reshape(sin, (b, s, half)))


def hf_get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """First present key of an HF config (names differ between architectures and releases)."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def hf_rotary_dim(cfg: dict[str, Any], head_dim: int) -> int:
    """Dimensions of a head that RoPE rotates (`partial_rotary_factor`, top level or in rope_parameters)."""
    params = cfg.get("rope_parameters") or {}
    return int(head_dim * float(hf_get(cfg, "partial_rotary_factor", default=params.get("partial_rotary_factor", 1.0))))


def map_name(table: list[tuple[str, str]], name: str) -> str:
    """The model's name for an HF tensor name by a (pattern, replacement) table; KeyError for unknown names."""
    for pattern, repl in table:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(name)


def hf_rope(cfg: dict[str, Any], kinds: tuple[str, ...] = SUPPORTED_ROPE_TYPES) -> tuple[float, dict[str, Any]]:
    """RoPE base and scaling from an HF config, in both the old (rope_theta + rope_scaling) and the
    transformers 5 (rope_parameters) spelling. Returns (theta, scaling dict or {})."""
    params = cfg.get("rope_parameters") or {}
    scaling = dict(cfg.get("rope_scaling") or params)
    theta = float(hf_get(cfg, "rope_theta", default=params.get("rope_theta", 10000.0)))
    scaling.pop("rope_theta", None)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    kind = {"su": "longrope"}.get(kind, kind)  # Phi-3's first releases
    if kind not in kinds:
        raise MlccError(f"unsupported RoPE scaling {kind!r}; supported: {', '.join(kinds)}")
    if kind == "default":
        return theta, {}
    scaling["rope_type"] = kind
    return theta, scaling


@dataclass
class RopeTables:
    """RoPE as transformers computes it, for a model that applies it itself: inverse frequencies of the first
    `rotary_dim` dimensions (rotate-half layout), cos and sin multiplied by `attention_factor`. LongRoPE has a
    second set, `long_inv_freq`, used for a whole sequence once it is longer than `switch_length`."""

    rotary_dim: int
    inv_freq: np.ndarray  # [rotary_dim / 2] float32
    attention_factor: float = 1.0
    long_inv_freq: np.ndarray | None = None
    switch_length: int = 0

    @classmethod
    def from_config(
        cls, theta: float, rotary_dim: int, scaling: dict[str, Any], max_positions: int, original_max: int | None = None
    ) -> RopeTables:
        """transformers' `_compute_default_rope_parameters` / `_compute_longrope_parameters` in float32."""
        exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
        base = np.power(np.float32(theta), exponents, dtype=np.float32)  # [rotary_dim / 2]
        kind = scaling.get("rope_type", "default")
        if kind == "default":
            return cls(rotary_dim, (np.float32(1) / base).astype(np.float32))
        if kind == "linear":
            return cls(rotary_dim, ((np.float32(1) / base) / np.float32(scaling["factor"])).astype(np.float32))
        if kind != "longrope":
            raise MlccError(f"RoPE scaling {kind!r} is not supported for this architecture")
        original = int(scaling.get("original_max_position_embeddings") or original_max or max_positions)
        factor = scaling.get("factor") or max_positions / original
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        short, long = (np.asarray(scaling[k], dtype=np.float32) for k in ("short_factor", "long_factor"))
        if short.shape != base.shape or long.shape != base.shape:
            raise MlccError(f"LongRoPE factors must have {len(base)} entries (rotary_dim / 2)")
        return cls(rotary_dim, (1 / (short * base)).astype(np.float32), float(attention), 1 / (long * base), original)

    def tables(self, positions: Tensor, batch: Any, seq: Any, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """cos and sin [b, s, rotary_dim / 2] at the query positions [b*s] of this call.

        LongRoPE uses the long factors for a token whose sequence is longer than `switch_length` in the forward
        that computes it (transformers chooses per forward call by its length): `lengths` [b*s] gives each token
        that length (in prefill, its whole prompt's, however the engine chunks it); without `lengths` (decode)
        it is the token's position + 1."""
        half = self.rotary_dim // 2
        factor = self.attention_factor
        long, switch = self.long_inv_freq, self.switch_length
        inputs = [op.reshape(positions, (batch, seq)), Tensor.from_const(self.inv_freq)]
        if long is not None:
            inputs.append(Tensor.from_const(long.astype(np.float32)))
            if lengths is not None:
                inputs.append(op.reshape(lengths, (batch, seq)))

        def compute(pos: te.Tensor, short: te.Tensor, *long_rope: te.Tensor) -> list[te.Tensor]:
            def angle(r, t, i):
                freq = short[i]
                if long_rope:
                    length = long_rope[1][r, t] if len(long_rope) > 1 else pos[r, t] + 1
                    freq = tirx.if_then_else(length > switch, long_rope[0][i], short[i])
                return pos[r, t].astype("float32") * freq

            shape = (*pos.shape, half)
            cos = te.compute(shape, lambda r, t, i: tirx.cos(angle(r, t, i)) * factor, name="rope_cos")
            sin = te.compute(shape, lambda r, t, i: tirx.sin(angle(r, t, i)) * factor, name="rope_sin")
            return [cos, sin]

        # Opaque to operator fusion: fused into apply_rope, cos and sin would be recomputed (libm, one lane at a
        # time) for every head of q and k (Gemma 3, 128 tokens: 0.31 ms per call instead of 0.02).
        cos_sin = op.tensor_expr_op(compute, "rope_tables", inputs, attrs={"op_pattern": OPAQUE_PATTERN})
        return cos_sin[0], cos_sin[1]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE of the first 2 * cos.shape[-1] dims of x [b, s, h, d]; the rest pass through.

    Computed as [b, s, h, 2, half] (part 0: x1 * cos - x2 * sin, part 1: x2 * cos + x1 * sin), so that each half
    reads its partner contiguously and the CPU build vectorizes it (Gemma 3's heads, 128 tokens: 4x faster)."""
    b, s, h, d = x.shape
    half = int(cos.shape[-1])

    def compute(xt: te.Tensor, c: te.Tensor, sn: te.Tensor) -> te.Tensor:
        def body(bb, t, hh, part, i):
            value = xt[bb, t, hh, part * half + i].astype("float32")
            partner = xt[bb, t, hh, (1 - part) * half + i].astype("float32")
            rotated = tirx.if_then_else(part == 0, -partner, partner)
            return (value * c[bb, t, i] + rotated * sn[bb, t, i]).astype(xt.dtype)

        return te.compute((b, s, h, 2, half), body, name="rope")

    rotated = op.reshape(op.tensor_expr_op(compute, "rope", [x, cos, sin]), (b, s, h, 2 * half))
    if 2 * half == int(d):
        return rotated
    rest = op.split(x, [2 * half], axis=3)[1]
    return op.concat([rotated, rest], dim=3)


def rope_attention(
    kv: PagedKVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], sm_scale: float
) -> Tensor:
    """Attention through the paged KV cache of q [b, s, hq, d], k and v [b, s, hkv, d], the model rotating q and
    k with `rope` (cos, sin); returns [b, s, hq * d]."""
    b, s, heads, dim = q.shape
    qkv = op.concat([apply_rope(q, *rope), apply_rope(k, *rope), v], dim=2)  # [b, s, hq + 2 hkv, d]
    out = kv.attention_with_fused_qkv(layer, qkv, int(heads), sm_scale=sm_scale)  # [b, s, hq, d]
    return op.reshape(out, (b, s, heads * dim))


class DecoderModel(nn.Module):
    """The frame the newer architectures share: `token_embd`, blocks `blk` called as block(x, kv, layer, rope),
    `output_norm` and `output`; the model applies RoPE (`self.rope`, tables computed once per call)."""

    cfg: ModelConfig
    rope: RopeTables

    def embed(self, ids: Tensor) -> Tensor:
        return self.token_embd(ids)  # [n, h]

    def body(self, x: Tensor, kv: PagedKVCache, lengths: Tensor | None = None) -> Tensor:
        """`lengths`: see RopeTables.tables (only models with `rope_switch_length` in their layout take it)."""
        b, s, _ = x.shape
        rope = self.rope.tables(kv.get_query_positions(b * s), b, s, lengths)  # cos, sin [b, s, rotary_dim / 2]
        for layer, block in enumerate(self.blk):
            x = block(x, kv, layer, rope)
        return self.output_norm(x)  # [b, s, h]

    def head(self, x: Tensor) -> Tensor:
        return self.output(x)  # [b, s, vocab]

    def layer_window(self, layer: int) -> int | None:
        return self.cfg.sliding_window

    def attention_layout(self) -> AttentionLayout:
        c = self.cfg
        return AttentionLayout(
            num_layers=c.num_layers,
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            rope_theta=10000.0,  # unused: the model applies RoPE
            layer_windows=[self.layer_window(i) for i in range(c.num_layers)],
            model_applies_rope=True,
            rope_switch_length=self.rope.switch_length if self.rope.long_inv_freq is not None else 0,
        )
