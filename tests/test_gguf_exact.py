"""llama.cpp numerics (tir_kernels/matmul_llamacpp*.py, norms_activations.py, rope.py): each kernel gives ggml's
numbers bit for bit, checked against tests/ggml_reference.py (ggml's AVX2 arithmetic in numpy, itself checked
against llama.cpp)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import tvm
from ggml_reference import decode_attention, geglu, rms_norm, rope_neox, swiglu, v_expf, vec_dot, vec_dot_k
from gguf import GGMLQuantizationType as Q
from tvm.script import tirx as T

from compiler.targets import TargetRequest, resolve_target, strict_float
from tir_kernels import attention, ggml_math, matmul_llamacpp, norms_activations, repack, rope
from tir_kernels.numerics import Numerics
from tir_kernels.simd import AskAhead, has_avx2, has_vnni, vector_registers

TARGET = strict_float(resolve_target(TargetRequest())).target
pytestmark = pytest.mark.skipif(not has_avx2(TARGET), reason="llama.cpp numerics are built for AVX2 CPUs")


def _run(func, *arrays, outputs):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)
    outs = [tvm.runtime.tensor(np.zeros(shape, np.float32)) for shape in outputs]
    lib["main"](*(tvm.runtime.tensor(a) for a in arrays), *outs)
    return [o.numpy() for o in outs]


def _blocks(qtype: Q, rows: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """Random GGUF rows: small float16 scales (and mins), random codes."""
    blocks = n_in // 32
    if qtype in (Q.Q4_K, Q.Q6_K):
        size, at = (144, 0) if qtype == Q.Q4_K else (210, 208)
        raw = rng.integers(0, 256, (rows, n_in // 256, size), dtype=np.uint8)
        halves = 2 if qtype == Q.Q4_K else 1
        raw[..., at : at + 2 * halves] = (
            np.abs(rng.normal(0, 0.002, (rows, n_in // 256, halves))).astype(np.float16).view(np.uint8)
        )
    elif qtype == Q.Q5_0:
        raw = rng.integers(0, 256, (rows, blocks, 22), dtype=np.uint8)
        raw[..., 0:2] = rng.normal(0, 0.02, (rows, blocks, 1)).astype(np.float16).view(np.uint8)
    elif qtype == Q.Q4_1:
        raw = rng.integers(0, 256, (rows, blocks, 20), dtype=np.uint8)
        raw[..., 0:4] = rng.normal(0, 0.02, (rows, blocks, 2)).astype(np.float16).view(np.uint8)
    else:
        raw = rng.integers(-127, 128, (rows, blocks, 34)).astype(np.int8).view(np.uint8)
        raw[..., 0:2] = np.abs(rng.normal(0, 0.01, (rows, blocks, 1))).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize(
    ("qtype", "n_in", "n_out"),
    [
        (Q.Q4_1, 96, 13),
        (Q.Q8_0, 64, 11),
        (Q.Q4_1, 4096, 17),  # word passes in 7 segments of chunks, the last shorter
        (Q.Q5_0, 96, 13),
        (Q.Q5_0, 2080, 9),  # 4 segments
        (Q.Q8_0, 1600, 10),  # 4 segments
        (Q.Q5_0, 640, 45),  # AVX-512: 3 pairs of row groups, the last rows past n_out
        (Q.Q8_0, 96, 37),  # AVX-512: 2 pairs and a group alone
        (Q.Q4_K, 512, 13),
        (Q.Q4_K, 4096, 9),  # 70 tokens: a block of 64, then a quad and 2 through the GEMV
        (Q.Q6_K, 768, 11),
        (Q.Q6_K, 4096, 9),
        (Q.Q4_K, 256, 37),  # AVX-512: 2 pairs of row groups and a group alone
        (Q.Q6_K, 512, 45),  # AVX-512: 3 pairs, the last rows past n_out
    ],
)
@pytest.mark.parametrize(
    ("vnni", "registers", "ask"),
    [
        (False, 16, AskAhead.NONE),
        (True, 16, AskAhead.NONE),
        (True, 32, AskAhead.PAIRS),
        (True, 32, AskAhead.ONE_GROUP),
        (True, 32, AskAhead.NONE),
    ],
    ids=["avx2", "vnni", "vnni32", "vnni32-one-group", "vnni32-quiet"],
)
def test_matmul_is_ggml_vec_dot(qtype: Q, n_in: int, n_out: int, vnni: bool, registers: int, ask: AskAhead):
    """With 32 vector registers, each pass over two row groups takes several words (`WORDS_PER_PASS`); one-token
    passes take a pair of row groups side by side (`AskAhead.PAIRS`, as on Intel CPUs) or one group after another
    (as on AMD's; Zen 4's, `NONE`, leave the weights to the hardware prefetcher and sum Q4_K's nibbles in two
    chains)."""
    if vnni and not has_vnni(TARGET):
        pytest.skip("this CPU has no vpdpbusd")
    if registers > vector_registers(TARGET):
        pytest.skip(f"this CPU has {vector_registers(TARGET)} vector registers")
    rng = np.random.default_rng(0)
    raw = _blocks(qtype, n_out, n_in, rng)
    kernel = matmul_llamacpp.llamacpp_matmul(qtype, n_in, n_out, vnni, registers, ask_ahead=ask)
    data = tvm.runtime.tensor(repack.group_rows(raw, qtype))
    lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=TARGET)
    for tokens in (1, 3, 8, 19, 70):  # 70: two blocks of tokens at 4096 columns
        x = (rng.standard_normal((tokens, n_in)) * rng.uniform(0.01, 5, (tokens, 1))).astype(np.float32)
        x[0, :32] = 0  # an all-zero block: scale 0
        y = tvm.runtime.tensor(np.zeros((tokens, n_out), np.float32))
        lib["main"](tvm.runtime.tensor(x), data, y)
        reference = vec_dot_k if qtype in (Q.Q4_K, Q.Q6_K) else vec_dot
        np.testing.assert_array_equal(y.numpy(), reference(raw, qtype.name, x))


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q4_K])
def test_matmul_tasks_each_run_once_whatever_the_pool(qtype: Q):
    """In prefill the threads claim the matmul's 64 tasks (`simd.claimed_tasks`): with 1 to 4 threads (4 on
    fewer cores: threads preempted mid-task) every output row is written, by ggml's numbers, whichever thread
    took it. Decode (1 token) keeps each thread's run of tasks."""
    n_in, n_out = 512, 1040  # 130 row groups: 64 tasks of 2 or 3 (AVX-512: 65 pairs, the last a group alone)
    vnni, registers = has_vnni(TARGET), vector_registers(TARGET)
    rng = np.random.default_rng(1)
    raw = _blocks(qtype, n_out, n_in, rng)
    kernel = matmul_llamacpp.llamacpp_matmul(qtype, n_in, n_out, vnni, registers, ask_ahead=AskAhead.PAIRS)
    data = tvm.runtime.tensor(repack.group_rows(raw, qtype))
    lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=TARGET)
    reference = vec_dot_k if qtype == Q.Q4_K else vec_dot
    config_pool = tvm.get_global_func("runtime.config_threadpool")
    try:
        for threads in (1, 2, 3, 4):
            config_pool(-3, threads)
            for tokens in (1, 4, 19):
                x = rng.standard_normal((tokens, n_in)).astype(np.float32)
                expected = reference(raw, qtype.name, x)
                for _ in range(5):
                    y = tvm.runtime.tensor(np.full((tokens, n_out), np.nan, np.float32))
                    lib["main"](tvm.runtime.tensor(x), data, y)
                    np.testing.assert_array_equal(y.numpy(), expected)
    finally:
        config_pool(-3, max(1, (os.cpu_count() or 2) // 2))  # TVM's own default on x86


@pytest.mark.parametrize("flush_tiny", [False, True])
def test_v_expf_is_ggml(flush_tiny: bool):
    x = np.concatenate([np.linspace(-200, 100, 4000), [0.0, -0.0, -87.3, -88.7, -103.9, 88.0]]).astype(np.float32)
    x = np.concatenate([x, np.zeros(-len(x) % 8, np.float32)])
    n = len(x)

    @T.prim_func
    def func(a: T.Buffer((n,), "float32"), out: T.Buffer((n,), "float32")):
        for v in range(n // 8):
            out[T.Ramp(v * 8, 1, 8)] = ggml_math.v_expf(a[T.Ramp(v * 8, 1, 8)], flush_tiny)

    (ours,) = _run(func, x, outputs=[(n,)])
    expected = v_expf(x)
    if flush_tiny:  # 0 where ggml takes its path for n < -126 (every result there under float32's normals)
        tiny = np.rint(x.astype(np.float64) / np.log(2)) < -126
        assert 0 < tiny.sum() < n and expected[tiny].max() < np.finfo(np.float32).tiny
        expected = np.where(tiny, np.float32(0), expected)
    np.testing.assert_array_equal(ours, expected)
    normal = np.abs(x) < 80
    np.testing.assert_allclose(ours[normal], np.exp(x[normal]), rtol=2e-6)  # it is an exp


@pytest.mark.parametrize("hidden", [576, 37])
def test_rms_norm_is_ggml(hidden: int):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((19, hidden)) * 4).astype(np.float32)  # two blocks of 8 rows and 3 alone
    x[::2, ::7] *= 1e7  # rows whose float64 sums depend on their order
    w = rng.standard_normal(hidden).astype(np.float32)
    (ours,) = _run(norms_activations.rms_norm_kernel(hidden, 1e-5), x, w, outputs=[x.shape])
    np.testing.assert_array_equal(ours, rms_norm(x, w, 1e-5))


# 5 rows go row by row in parallel; 1 or 3 rows of MIN_SPANS * SPAN columns or more in spans of SPAN columns,
# the tail past the last whole vector in the last span (4099, 5131); shorter ones on the calling thread (2051)
GATED_SHAPES = [(5, 1536), (5, 13), (1, 13), (1, 2051), (1, 4099), (3, 4099), (1, 5131), (5, 5131)]


@pytest.mark.parametrize(("rows", "width"), GATED_SHAPES)
def test_swiglu_is_ggml(rows: int, width: int):
    rng = np.random.default_rng(3)
    g = (rng.standard_normal((rows, width)) * 6).astype(np.float32)
    g[0, :8] = [-100, -90, 89, 95, 120, 0, -0.0, 3]  # the exp's special cases
    u = rng.standard_normal((rows, width)).astype(np.float32)
    (ours,) = _run(norms_activations.swiglu_kernel(width), g, u, outputs=[g.shape])
    np.testing.assert_array_equal(ours, swiglu(g, u))


# sha256 of llama.cpp's own ggml_table_gelu_f16 (read from libggml-cpu of llama-cpp-python 0.3.36, AVX2 build).
LLAMACPP_GELU_TABLE_SHA256 = "5eceda6f287dec9dc0bcfa24516d6744a031a5c52d1984688b4558aeb1daf909"


def test_gelu_table_is_llamacpps():
    table = ggml_math.gelu_f16_table()
    assert hashlib.sha256(table.view(np.uint16).tobytes()).hexdigest() == LLAMACPP_GELU_TABLE_SHA256


@pytest.mark.parametrize(("rows", "width"), GATED_SHAPES)
def test_geglu_is_ggml(rows: int, width: int):
    rng = np.random.default_rng(4)
    g = (rng.standard_normal((rows, width)) * 4).astype(np.float32)
    g[0, :10] = [-10, 10, -10.5, 9.999, 0, -0.0, 1e-7, 65504, 7e4, -3e38]  # the cut-offs, float16's edges
    u = rng.standard_normal((rows, width)).astype(np.float32)
    table = ggml_math.gelu_f16_table()
    (ours,) = _run(norms_activations.geglu_kernel(width), g, u, table, outputs=[g.shape])
    np.testing.assert_array_equal(ours, geglu(g, u, table))
    x = g[1:].astype(np.float64)
    exact = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))) * u[1:]
    np.testing.assert_allclose(ours[1:], exact, rtol=2e-3, atol=2e-3)  # it is a GeLU (to float16)


@pytest.mark.parametrize(("heads", "dim", "base"), [(4, 256, 10_000.0), (3, 64, 1_000_000.0)])
def test_neox_rope_is_ggml(heads: int, dim: int, base: float):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, heads, dim)).astype(np.float32)
    positions = np.array([0, 1, 2, 17, 300, 511, 4000], np.int32)
    tables = _run(rope.neox_tables_kernel(dim, base), positions, outputs=[(len(positions), dim // 2)] * 2)
    (ours,) = _run(rope.neox_rotate_kernel(heads, dim), x, *tables, outputs=[x.shape])
    np.testing.assert_array_equal(ours, rope_neox(x, positions, base))
    angle = positions[:, None, None] * base ** (-2 * np.arange(dim // 2) / dim)
    rotated = np.concatenate([x[..., : dim // 2], x[..., dim // 2 :]], -1)  # the same halves, rotated in float64
    exact = np.concatenate(
        [
            rotated[..., : dim // 2] * np.cos(angle) - rotated[..., dim // 2 :] * np.sin(angle),
            rotated[..., : dim // 2] * np.sin(angle) + rotated[..., dim // 2 :] * np.cos(angle),
        ],
        -1,
    )
    np.testing.assert_allclose(ours, exact, atol=2e-3)  # it is a rotation


@pytest.mark.parametrize(("rows", "exact"), [(640, True), (644, False)])
def test_q4_k_is_exact_only_in_whole_row_groups(rows: int, exact: bool):
    """llama.cpp repacks Q4_K (the kernels mlcc follows) only when its rows come in groups of 8."""
    from quant_schemes.gguf_native import GGUFNativeScheme

    types = {"blk.0.ffn_down.weight": Q.Q4_K, "blk.0.ffn_up.weight": Q.Q5_0}
    scheme = GGUFNativeScheme(types, rows={"blk.0.ffn_down.weight": rows, "blk.0.ffn_up.weight": 2048})
    scheme.prepare(TARGET)
    assert (scheme.numerics == Numerics.LLAMACPP) == exact


def decode_case(kv_heads: int, heads: int, dim: int, lengths: list, seed: int, spread: float = 1.0):
    """One token per sequence against its K and V in shuffled pages of 16 (2 pages no sequence uses): the decode
    kernel's arguments up to its output, and each sequence's K and V as [kv heads, length, dim]."""
    page = 16
    rng = np.random.default_rng(seed)
    counts = [-(-n // page) for n in lengths]
    order = rng.permutation(sum(counts) + 2).astype(np.int32)
    pages = (rng.standard_normal((order.size, 2, kv_heads, page, dim)) * 2).astype(np.float16).astype(np.float32)
    q = (rng.standard_normal((len(lengths), heads, dim)) * 2 * spread).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([n - (c - 1) * page for n, c in zip(lengths, counts)], np.int32)
    none = np.zeros(len(lengths), np.int32)
    caches = []
    for b, n in enumerate(lengths):
        rows = pages[order[indptr[b] : indptr[b + 1]]]  # [pages, 2, kv heads, page, dim]
        caches.append(tuple(rows[:, kind].transpose(1, 0, 2, 3).reshape(kv_heads, -1, dim)[:, :n] for kind in (0, 1)))
    return [q, pages, indptr, order[: indptr[-1]], last, none, np.array(lengths, np.int32)], caches


def run_decode(lib, args: list) -> tuple[np.ndarray, np.ndarray]:
    """(output, log-sum-exps) of a compiled decode kernel on `decode_case` arguments."""
    q = args[0]
    out = tvm.runtime.tensor(np.zeros(q.shape, np.float32))
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out, lse, 0, 1.0, 10_000.0, 1 / np.sqrt(q.shape[-1]))
    return out.numpy(), lse.numpy()


@pytest.mark.parametrize("lengths", [[45, 5, 100], [300, 5]], ids=["short", "long"])
@pytest.mark.parametrize("wide", [False, True], ids=["256-bit", "512-bit"])
@pytest.mark.parametrize(
    ("kv_heads", "heads", "dim", "spread"), [(3, 9, 64, 1), (1, 4, 256, 1), (2, 4, 80, 1), (1, 4, 256, 12)]
)
def test_decode_attention_is_ggml(kv_heads: int, heads: int, dim: int, spread: float, wide: bool, lengths: list):
    """One token per sequence against its paged K/V (pages shuffled): lengths under 8, under 32 and past both
    with a partial page; head size 80 leaves 16 elements of each K.q to ggml's float64 tail. `spread` scales
    the queries: at 12 many scores sit over 87 below the peak, where ggml's exp is subnormal and mlcc's 0.
    `wide`: K.q and P.V 16 elements a vector (AVX-512 targets), the same arithmetic lane for lane. A task takes
    one query head, or (a long context, or KV heads enough) the query heads of a KV head together
    (`decode_task_heads`): the short lengths with one KV head take the former, the rest the latter."""
    args, caches = decode_case(kv_heads, heads, dim, lengths, 6, spread)
    kernel = attention.decode_attention(kv_heads, heads, dim, 16, "float32", False, Numerics.LLAMACPP, wide=wide)
    out, _ = run_decode(tvm.compile(tvm.IRModule({"main": kernel}), target=TARGET), args)
    q, scale = args[0], 1 / np.sqrt(dim)
    tiny = []  # the share of each head's scores so far below its peak that ggml's exp is subnormal there
    for b, (k, v) in enumerate(caches):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            np.testing.assert_array_equal(out[b, h], decode_attention(q[b, h], k[kv], v[kv], scale))
            scores = k[kv] @ q[b, h] * scale
            tiny.append((scores < scores.max() - 88).mean())
    assert (max(tiny) > 0.2) == (spread > 1)


@pytest.mark.parametrize("wide", [False, True], ids=["256-bit", "512-bit"])
@pytest.mark.parametrize(
    ("kv_heads", "heads", "dim", "lengths"), [(3, 9, 64, [300]), (1, 1, 64, [300, 5, 150]), (1, 3, 80, [300])]
)
def test_split_decode_attention_is_ggml(monkeypatch, kv_heads: int, heads: int, dim: int, lengths: list, wide: bool):
    """Decode whose tasks leave threads idle (3 on 2) past SPLIT_LENGTH keys (lowered here) splits each task's
    keys over the threads for K.q, then takes the softmax and P.V a task at a time: each key's score the
    operations of one task (head size 80: every key K.q's one-at-a-time path, in the last piece), so ggml's
    arithmetic, and the log-sum-exps of the kernel on one thread (no split)."""
    from runtime.engine import set_threads

    monkeypatch.setattr(attention, "SPLIT_LENGTH", 100)
    set_threads(2)
    assert tvm.get_global_func("runtime.NumThreads")() == 2
    units = len(lengths) * heads // attention.decode_task_heads(kv_heads, heads // kv_heads, wide)
    assert 4 * units <= 3 * 2 * -(-units // 2)  # tasks that leave a quarter of 2 threads idle: split
    args, caches = decode_case(kv_heads, heads, dim, lengths, 9)
    kernel = attention.decode_attention(kv_heads, heads, dim, 16, "float32", False, Numerics.LLAMACPP, wide=wide)
    lib = tvm.compile(tvm.IRModule({"main": kernel}), target=TARGET)
    out, lse = run_decode(lib, args)
    q, scale = args[0], 1 / np.sqrt(dim)
    for b, (k, v) in enumerate(caches):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            np.testing.assert_array_equal(out[b, h], decode_attention(q[b, h], k[kv], v[kv], scale))
    set_threads(1)
    try:
        whole = run_decode(lib, args)
    finally:
        set_threads(os.cpu_count() or 1)
    np.testing.assert_array_equal(out, whole[0])
    np.testing.assert_array_equal(lse, whole[1])


@pytest.mark.parametrize(("pairs", "wide"), [(False, False), (True, True)], ids=["one-head", "head-pairs-512-bit"])
@pytest.mark.parametrize(("kv_heads", "heads", "dim"), [(3, 9, 64), (2, 4, 80), (1, 4, 256)])
def test_ragged_attention_of_one_token_is_ggml(kv_heads: int, heads: int, dim: int, pairs: bool, wide: bool):
    """Prefill of one new token per sequence (non-causal, against 45 and 100 keys) takes the one-token order
    (_attend_ggml_heads over a task's heads: two with `pairs` and an even group) and meets ggml's arithmetic
    bit for bit."""
    lengths = [45, 100]
    rng = np.random.default_rng(8)
    q = (rng.standard_normal((len(lengths), heads, dim)) * 2).astype(np.float32)
    k, v = (
        (rng.standard_normal((sum(lengths), kv_heads, dim)) * 2).astype(np.float16).astype(np.float32) for _ in "kv"
    )
    q_indptr = np.arange(len(lengths) + 1, dtype=np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    scale = 1 / np.sqrt(dim)
    kernel = attention.prefill_ragged_attention(
        kv_heads, heads, dim, dim, "float32", Numerics.LLAMACPP, head_pairs=pairs, wide=wide
    )
    lib = tvm.compile(tvm.IRModule({"main": kernel}), target=TARGET)
    out = tvm.runtime.tensor(np.zeros(q.shape, np.float32))
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32))
    positions = np.zeros(len(lengths), np.int32)
    args = [q, q_indptr, k, v, kv_indptr, positions, positions]
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out, lse, 0, 0, 1.0, 10_000.0, scale)
    for b in range(len(lengths)):
        keys = slice(kv_indptr[b], kv_indptr[b + 1])
        for h in range(heads):
            kv = h // (heads // kv_heads)
            expected = decode_attention(q[b, h], k[keys, kv], v[keys, kv], scale)
            np.testing.assert_array_equal(out.numpy()[b, h], expected)


@pytest.mark.parametrize(("kv_heads", "heads", "dim", "tokens"), [(1, 4, 256, 45), (2, 4, 64, 13)])
def test_ragged_attention_head_pairs_are_the_same_arithmetic(kv_heads: int, heads: int, dim: int, tokens: int):
    """Prefill in llama.cpp's order with query heads two at a time (sharing each K and V read) gives the bits
    of one head at a time: causal lengths 1..tokens cover the 4-key and 8-key tails."""
    rng = np.random.default_rng(7)
    q = (rng.standard_normal((tokens, heads, dim)) * 2).astype(np.float32)
    k, v = ((rng.standard_normal((tokens, kv_heads, dim)) * 2).astype(np.float16).astype(np.float32) for _ in "kv")
    indptr = np.array([0, tokens], np.int32)
    outputs = []
    for pairs in (False, True):
        kernel = attention.prefill_ragged_attention(
            kv_heads, heads, dim, dim, "float32", Numerics.LLAMACPP, head_pairs=pairs
        )
        lib = tvm.compile(tvm.IRModule({"main": kernel}), target=TARGET)
        out = tvm.runtime.tensor(np.zeros(q.shape, np.float32))
        lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32))
        args = [q, indptr, k, v, indptr, np.arange(tokens, dtype=np.int32), np.zeros(1, np.int32)]
        lib["main"](*(tvm.runtime.tensor(a) for a in args), out, lse, 1, 0, 1.0, 10_000.0, 1 / np.sqrt(dim))
        outputs.append((out.numpy(), lse.numpy()))
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
    assert np.abs(outputs[0][0]).max() > 0
