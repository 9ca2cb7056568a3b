"""mlcc's CPU RoPE kernel gives what TVM's KV-cache RoPE kernel (the one it replaces) gives."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

from tir_kernels.numerics import Numerics
from tir_kernels.rope import RopeSpec, split_rotary


@pytest.mark.parametrize(("head_dim", "rotary_dim", "heads", "kv_heads"), [(64, 64, 9, 3), (48, 32, 3, 1)])
@pytest.mark.parametrize("apply_rope", [1, 0])
@pytest.mark.parametrize("gptj", [False, True])
def test_split_rotary_matches_tvm(
    head_dim: int, rotary_dim: int, heads: int, kv_heads: int, apply_rope: int, gptj: bool
):
    theta, tokens = 10_000.0, 37
    ours = split_rotary(RopeSpec(theta, rotary_dim, head_dim, heads, kv_heads, "float32", gptj))
    scaling = {"rope_type": "gptj"} if gptj else {}
    theirs = llama_rope_with_position_map(theta, 1, head_dim, heads, kv_heads, "float32", scaling, rotary_dim)
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((tokens, heads + 2 * kv_heads, head_dim)).astype(np.float32)
    positions = rng.permutation(4096)[:tokens].astype(np.int32)  # far positions: large angles
    results = []
    for func in (ours, theirs):
        lib = tvm.compile(tvm.IRModule({"rope": func.with_attr("global_symbol", "rope")}), target="llvm")
        outs = [np.zeros((tokens, n, head_dim), np.float32) for n in (heads, kv_heads, kv_heads)]
        args = [tvm.runtime.tensor(a) for a in (qkv, positions, *outs)]
        lib["rope"](*args, apply_rope)
        results.append([a.numpy() for a in args[2:]])
    for mine, reference in zip(*results):
        np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-5)
    q = results[0][0]
    assert (not np.allclose(q, qkv[:, :heads])) == bool(apply_rope)
    np.testing.assert_array_equal(q[..., rotary_dim:], qkv[:, :heads, rotary_dim:])


@pytest.mark.parametrize("gptj", [True, False])
def test_split_rotary_llamacpp_is_ggml_bit_for_bit(gptj: bool):
    """llama.cpp numerics: ggml_rope_cache_init's angles (theta *= theta_scale per pair, libm cosf/sinf), its
    rotation as GCC contracts it (fma(x0, cos, -(x1 sin)), fma(x0, sin, x1 cos)), K and V rounded to float16."""
    from ggml_reference import LIBM, f16, fma

    from tir_kernels.ggml_math import ggml_theta_scale

    theta, dim, heads, kv_heads, tokens = 100_000.0, 64, 3, 1, 29
    spec = RopeSpec(theta, dim, dim, heads, kv_heads, "float32", gptj, numerics=Numerics.LLAMACPP)
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((tokens, heads + 2 * kv_heads, dim)).astype(np.float32)
    positions = rng.permutation(8192)[:tokens].astype(np.int32)
    lib = tvm.compile(tvm.IRModule({"rope": split_rotary(spec).with_attr("global_symbol", "rope")}), target="llvm")
    outs = [tvm.runtime.tensor(np.zeros((tokens, n, dim), np.float32)) for n in (heads, kv_heads, kv_heads)]
    lib["rope"](tvm.runtime.tensor(qkv), tvm.runtime.tensor(positions), *outs, 1)
    q, k, v = (o.numpy() for o in outs)

    scale = np.float32(ggml_theta_scale(theta, dim))
    cos, sin = np.zeros((tokens, dim // 2), np.float32), np.zeros((tokens, dim // 2), np.float32)
    for t, p in enumerate(positions):
        angle = np.float32(p)
        for i in range(dim // 2):
            cos[t, i], sin[t, i] = LIBM.cosf(float(angle)), LIBM.sinf(float(angle))
            angle = np.float32(angle * scale)
    first, second = (slice(0, dim, 2), slice(1, dim, 2)) if gptj else (slice(0, dim // 2), slice(dim // 2, dim))
    rotated = np.empty_like(qkv[:, : heads + kv_heads])
    x0, x1 = qkv[:, : heads + kv_heads, first], qkv[:, : heads + kv_heads, second]
    c, s = cos[:, None], sin[:, None]
    rotated[..., first] = fma(x0, c, -(x1 * s).astype(np.float32))
    rotated[..., second] = fma(x0, s, (x1 * c).astype(np.float32))
    np.testing.assert_array_equal(q, rotated[:, :heads])
    np.testing.assert_array_equal(k, f16(rotated[:, heads:]))
    np.testing.assert_array_equal(v, f16(qkv[:, heads + kv_heads :]))
