"""mlcc's CPU attention kernels (tir_kernels/attention.py) in mlcc's order: paged prefill, a chunk's new tokens
against the cached tokens of their sequence."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tvm

from compiler.targets import TargetRequest, resolve_target
from tir_kernels import attention

TARGET = resolve_target(TargetRequest()).target
PAGE = 16


def _paged_prefill(kv_heads, heads, dim, window, cached, new, causal, pages, order, q, wide):
    """Output and log2-sum-exp of paged prefill for sequences with `cached` tokens in the pages and `new` tokens."""
    dtype = str(q.dtype)
    kernel = attention.prefill_paged_attention(kv_heads, heads, dim, PAGE, dtype, window > 0, window, wide=wide)
    lib = tvm.compile(tvm.IRModule({"main": kernel}), target=TARGET)
    counts = [-(-n // PAGE) for n in cached]
    page_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([n - (c - 1) * PAGE for n, c in zip(cached, counts)], np.int32)
    length_info = np.stack([last, np.zeros_like(last), np.zeros_like(last)]) if window else last
    q_indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    out = tvm.runtime.tensor(np.zeros(q.shape, dtype))
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32))
    args = [q, q_indptr, pages, page_indptr, order[: page_indptr[-1]], length_info, np.zeros(len(new), np.int32)]
    args.append(np.arange(q.shape[0], dtype=np.int32))
    scale = 1 / np.sqrt(dim)
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out, lse, causal, 0, 1.0, 10_000.0, scale)
    return out.numpy(), lse.numpy()


@pytest.mark.parametrize("wide", [False, True], ids=["256-bit", "512-bit"])
@pytest.mark.parametrize(("window", "causal"), [(0, 1), (0, 0), (20, 1)], ids=["causal", "full", "sliding"])
def test_paged_prefill_shares_key_tiles_between_tokens(monkeypatch, window: int, causal: int, wide: bool):
    """Tokens of one sequence go through each tile of cached keys together, each query with its own causal or
    sliding range: the same bits as token by token, and softmax attention over the keys each token sees. The
    batch's sequences (5, 2 and 19 new tokens) make a task that spans all three (a run of each). `wide`: 16
    elements per vector (AVX-512), head size 80 there (5 vectors: one chain)."""
    kv_heads, heads = 2, 4
    dim = 80 if wide else 64
    cached, new = [37, 20, 70], [5, 2, 19]
    rng = np.random.default_rng(8)
    order = rng.permutation(sum(-(-n // PAGE) for n in cached) + 2).astype(np.int32)
    pages = rng.standard_normal((order.size, 2, kv_heads, PAGE, dim)).astype(np.float32)
    q = rng.standard_normal((sum(new), heads, dim)).astype(np.float32)
    ours = _paged_prefill(kv_heads, heads, dim, window, cached, new, causal, pages, order, q, wide)
    monkeypatch.setattr(attention, "TOKENS_PER_TASK", 1)
    alone = _paged_prefill(kv_heads, heads, dim, window, cached, new, causal, pages, order, q, wide)
    np.testing.assert_array_equal(ours[0], alone[0])
    np.testing.assert_array_equal(ours[1], alone[1])
    starts = np.cumsum([0] + [-(-n // PAGE) for n in cached])
    for s, (n_cached, n_new) in enumerate(zip(cached, new)):
        rows = pages[order[starts[s] : starts[s + 1]]]
        k, v = (rows[:, kind].transpose(1, 0, 2, 3).reshape(kv_heads, -1, dim)[:, :n_cached] for kind in (0, 1))
        for i in range(n_new):
            row = sum(new[:s]) + i
            last = min(n_cached, n_cached - n_new + i + 1) if causal and not window else n_cached
            first = max(n_cached - max(window - i - 1, 0), 0) if causal and window else 0
            for h in range(heads):
                kh = h // (heads // kv_heads)
                if last <= first:
                    continue
                scores = k[kh, first:last].astype(np.float64) @ q[row, h] / np.sqrt(dim)
                p = np.exp(scores - scores.max())
                expected = p @ v[kh, first:last] / p.sum()
                np.testing.assert_allclose(ours[0][row, h], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wide", [False, True], ids=["256-bit", "512-bit"])
def test_paged_prefill_widens_a_float16_cache_exactly(wide: bool):
    """A float16 cache's tiles of keys and values are widened once per task (StagedKeys): the float32 kernel's
    bits on the same values, rounded to float16 at the end."""
    kv_heads, heads, dim = 2, 4, 80 if wide else 64
    cached, new = [37, 20, 70], [5, 2, 19]
    rng = np.random.default_rng(9)
    order = rng.permutation(sum(-(-n // PAGE) for n in cached) + 2).astype(np.int32)
    pages = rng.standard_normal((order.size, 2, kv_heads, PAGE, dim)).astype(np.float16)
    q = rng.standard_normal((sum(new), heads, dim)).astype(np.float16)
    narrow = _paged_prefill(kv_heads, heads, dim, 0, cached, new, 1, pages, order, q, wide)
    widened = _paged_prefill(
        kv_heads, heads, dim, 0, cached, new, 1, pages.astype(np.float32), order, q.astype(np.float32), wide
    )
    assert narrow[0].dtype == np.float16
    np.testing.assert_array_equal(narrow[0], widened[0].astype(np.float16))
    np.testing.assert_array_equal(narrow[1], widened[1])


def _decode(kv_heads, heads, dim, lengths, pages, order, q, wide):
    """Output and log2-sum-exp of mlcc-order decode: one query per sequence against its `lengths` paged keys."""
    kernel = attention.decode_attention(kv_heads, heads, dim, PAGE, "float32", False, wide=wide)
    lib = tvm.compile(tvm.IRModule({"main": kernel}), target=TARGET)
    counts = [-(-n // PAGE) for n in lengths]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([n - (c - 1) * PAGE for n, c in zip(lengths, counts)], np.int32)
    none = np.zeros(len(lengths), np.int32)
    out = tvm.runtime.tensor(np.zeros(q.shape, np.float32))
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32))
    args = [q, pages, indptr, order[: indptr[-1]], last, none, np.array(lengths, np.int32)]
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out, lse, 0, 1.0, 10_000.0, 1 / np.sqrt(dim))
    return out.numpy(), lse.numpy()


@pytest.mark.parametrize("wide", [False, True], ids=["256-bit", "512-bit"])
@pytest.mark.parametrize(("kv_heads", "heads", "dim"), [(3, 9, 64), (1, 4, 80)])
def test_decode_shares_keys_between_query_heads(monkeypatch, kv_heads: int, heads: int, dim: int, wide: bool):
    """Decode in mlcc's order with a task per KV head's query heads (long contexts, or many KV heads) gives the
    bits of a task per query head, and softmax attention; lengths under a tile, and past SHARED_LENGTH."""
    lengths = [300, 5, 45]
    rng = np.random.default_rng(9)
    order = rng.permutation(sum(-(-n // PAGE) for n in lengths) + 2).astype(np.int32)
    pages = rng.standard_normal((order.size, 2, kv_heads, PAGE, dim)).astype(np.float32)
    q = rng.standard_normal((len(lengths), heads, dim)).astype(np.float32)
    assert attention.decode_task_heads(kv_heads, heads // kv_heads, wide) > 1
    ours = _decode(kv_heads, heads, dim, lengths, pages, order, q, wide)
    monkeypatch.setattr(attention, "SHARED_LENGTH", 10**6)
    monkeypatch.setattr(attention, "SHARED_TASKS", 10**6)
    alone = _decode(kv_heads, heads, dim, lengths, pages, order, q, wide)
    np.testing.assert_array_equal(ours[0], alone[0])
    np.testing.assert_array_equal(ours[1], alone[1])
    starts = np.cumsum([0] + [-(-n // PAGE) for n in lengths])
    for s, n in enumerate(lengths):
        rows = pages[order[starts[s] : starts[s + 1]]]
        k, v = (rows[:, kind].transpose(1, 0, 2, 3).reshape(kv_heads, -1, dim)[:, :n] for kind in (0, 1))
        for h in range(heads):
            kh = h // (heads // kv_heads)
            scores = k[kh].astype(np.float64) @ q[s, h] / np.sqrt(dim)
            p = np.exp(scores - scores.max())
            np.testing.assert_allclose(ours[0][s, h], p @ v[kh] / p.sum(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wide", [False, True], ids=["256-bit", "512-bit"])
@pytest.mark.parametrize(("kv_heads", "heads", "dim", "lengths"), [(3, 9, 64, [300]), (1, 3, 80, [300])])
def test_split_decode_gives_the_bits_of_one_thread(monkeypatch, kv_heads, heads, dim, lengths, wide: bool):
    """Decode in mlcc's order whose tasks leave threads idle (3 on 2) past SPLIT_LENGTH keys (lowered here)
    scores each task's keys in pieces on every thread, then takes the softmax and P.V a task at a time: the
    bits of the kernel on one thread, which does not split."""
    from runtime.engine import set_threads

    monkeypatch.setattr(attention, "SPLIT_LENGTH", 100)
    units = len(lengths) * heads // attention.decode_task_heads(kv_heads, heads // kv_heads, wide)
    assert 4 * units <= 3 * 2 * -(-units // 2)  # tasks that leave a quarter of 2 threads idle: split
    rng = np.random.default_rng(10)
    order = rng.permutation(sum(-(-n // PAGE) for n in lengths) + 2).astype(np.int32)
    pages = rng.standard_normal((order.size, 2, kv_heads, PAGE, dim)).astype(np.float32)
    q = rng.standard_normal((len(lengths), heads, dim)).astype(np.float32)
    try:
        set_threads(2)
        split = _decode(kv_heads, heads, dim, lengths, pages, order, q, wide)
        set_threads(1)
        whole = _decode(kv_heads, heads, dim, lengths, pages, order, q, wide)
    finally:
        set_threads(os.cpu_count() or 1)
    np.testing.assert_array_equal(split[0], whole[0])
    np.testing.assert_array_equal(split[1], whole[1])
