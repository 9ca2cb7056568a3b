"""mlcc's CPU RoPE kernel gives what TVM's KV-cache RoPE kernel (the one it replaces) gives."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

from compiler.cpu_rope import RopeSpec, split_rotary


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
