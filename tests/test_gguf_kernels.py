"""The GGUF block decoders compiled by TVM give the weights gguf-py's reference dequantizer gives."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from tvm import te

from tir_kernels.gguf_blocks import DECODERS, BlockFormat
from tir_kernels.repack import GROUP_LAYOUTS, SUPER_LAYOUTS

Q = GGMLQuantizationType
# Byte offsets of the float16 fields (scales, minimums) in each block.
FLOAT16_FIELDS = {
    Q.Q4_0: [0],
    Q.Q5_0: [0],
    Q.Q8_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_1: [0, 2],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}


def compiled_decoder(fmt: BlockFormat, rows: int, cols: int):
    data = te.placeholder((rows, fmt.row_bytes(cols)), "uint8", name="data")
    out = te.compute((rows, cols), lambda r, c: fmt.weight_at_col(data, r, c), name="decode")
    return tvm.compile(te.create_prim_func([data, out]), target="llvm")


@pytest.mark.parametrize("qtype", sorted(DECODERS, key=lambda t: t.value), ids=lambda t: t.name)
def test_decoder_matches_gguf_reference(qtype: GGMLQuantizationType):
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    rows, cols = 3, 2 * block
    rng = np.random.default_rng(qtype.value)
    raw = rng.integers(0, 256, size=(rows, cols // block, block_bytes), dtype=np.uint8)
    for field in FLOAT16_FIELDS[qtype]:  # keep the float16 scales finite and moderate
        raw[..., field + 1] &= 0xBB
    raw = raw.reshape(rows, -1)
    expected = dequantize(raw, qtype).reshape(rows, cols)
    fn = compiled_decoder(BlockFormat(qtype), rows, cols)
    out = tvm.runtime.tensor(np.zeros((rows, cols), np.float32))
    fn(tvm.runtime.tensor(raw), out)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def _quantized_activations(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """x as the int8 kernels see it: round(x / d) * d per block, as llama.cpp quantizes activations: per 32
    columns with d = max|x| / 127 in float16 (Q8_0/Q8_1), or for K-quants per 256 columns with
    d = 1 / (127 / max|x|) in float32 (Q8_K)."""
    from tir_kernels.gguf_blocks import SUPER_BLOCK
    from tir_kernels.matmul_int8 import SUPER_BLOCK_TYPES

    if qtype in SUPER_BLOCK_TYPES:
        blocks = x.reshape(x.shape[0], -1, SUPER_BLOCK)
        amax = np.abs(blocks).max(-1, keepdims=True)
        inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
        d = np.where(inv > 0, np.float32(1) / np.where(inv > 0, inv, 1), 0).astype(np.float32)
    else:
        blocks = x.reshape(x.shape[0], -1, 32)
        d = (np.abs(blocks).max(-1, keepdims=True) / np.float32(127)).astype(np.float16).astype(np.float32)
        inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    return (np.round(blocks * inv) * d).reshape(x.shape)


def _int8_cases() -> list[tuple[GGMLQuantizationType, bool]]:
    from tir_kernels.repack import INTERLEAVED

    types = sorted(DECODERS, key=lambda t: t.value)
    return [(t, False) for t in types] + [(t, True) for t in types if t in INTERLEAVED]


@pytest.mark.parametrize("rows", [6, 13])
@pytest.mark.parametrize(
    ("qtype", "interleaved"), _int8_cases(), ids=lambda c: c.name if isinstance(c, Q) else ("rows8" if c else "")
)
def test_int8_activation_matmul(qtype: GGMLQuantizationType, interleaved: bool, rows: int):
    """The AVX2 kernels equal the dequantized weights times the 8-bit-rounded activations, with the weights
    as GGUF rows and, for some types, with 8 rows interleaved."""
    from compiler.targets import _host_llvm
    from tir_kernels.matmul_int8 import int8_matmul
    from tir_kernels.repack import interleave_rows
    from tir_kernels.simd import TOKENS, has_avx2

    target = _host_llvm()
    if not has_avx2(target):
        pytest.skip("the int8 kernels need an x86 CPU with AVX2")
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    cols = 512
    rng = np.random.default_rng(qtype.value)
    raw = rng.integers(0, 256, size=(rows, cols // block, block_bytes), dtype=np.uint8)
    for field in FLOAT16_FIELDS[qtype]:
        raw[..., field + 1] &= 0xBB
    raw = raw.reshape(rows, -1)
    weights = dequantize(raw, qtype).reshape(rows, cols)
    kernel = int8_matmul(qtype, cols, rows, raw.shape[1], interleaved).with_attr("global_symbol", "k")
    data = tvm.runtime.tensor(interleave_rows(raw, qtype) if interleaved else raw)
    fn = tvm.compile(tvm.IRModule({"k": kernel}), target=target)
    # one token and a few (token by token), two tiles and a remainder (a last tile that overlaps), more
    # tokens than one pass over unpacked rows takes (LANE_ACTIVATION_BYTES)
    for tokens in (1, 3, 2 * TOKENS + 3, 600):
        x = rng.standard_normal((tokens, cols)).astype(np.float32)
        x[tokens // 2, :256] = 0  # all-zero blocks (32 and 256 columns) have scale 0
        out = tvm.runtime.tensor(np.zeros((tokens, rows), np.float32))
        fn["k"](tvm.runtime.tensor(x), data, out)
        expected = _quantized_activations(x, qtype) @ weights.T
        scale = np.abs(expected).max()
        exact = np.isclose(out.numpy(), expected, rtol=1e-4, atol=1e-4 * scale)
        # an activation within float rounding of k + 1/2 may round the other way: rare, and one step
        assert exact.mean() > 0.999, f"{(~exact).sum()} of {exact.size} outputs differ"
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-2, atol=1e-3 * scale)
        assert np.abs(out.numpy() - x @ weights.T).max() > 0  # it really is the 8-bit computation


def _random_rows(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, blocks, block bytes] of random blocks with finite, moderate float16 scales."""
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, block_bytes), dtype=np.uint8)
    for field in FLOAT16_FIELDS[qtype]:
        raw[..., field + 1] &= 0xBB
    return raw


def _amx_target() -> tvm.target.Target:
    """This host's target; skips where the CPU has no AMX (conftest's `amx_tiles` asked Linux for the tiles)."""
    from compiler.targets import _host_llvm
    from tir_kernels.simd import has_amx

    target = _host_llvm()
    if not has_amx(target):
        pytest.skip("the AMX kernels need an x86 CPU with AMX-INT8 (Sapphire Rapids or newer)")
    return target


def _chunk_sum_expected(raw: np.ndarray, qtype: GGMLQuantizationType, x: np.ndarray) -> np.ndarray:
    """float64 y = llama.cpp's 8-bit activations of x times the weights of GGUF blocks raw [rows, chunks, bytes]:
    each chunk's exact integer sum scaled by d_w * d_x, and Q4_1/Q5_1's mins times the activations' float16 sums."""
    from ggml_reference import quantize_q8

    rows, chunks = raw.shape[:2]
    weights = dequantize(raw.reshape(rows, -1), qtype).reshape(rows, chunks, 32).astype(np.float64)
    mins = np.zeros((rows, chunks))
    if qtype in (Q.Q4_1, Q.Q5_1):  # the float16 min of each block
        mins = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    d, q, s = quantize_q8(x)
    expected = np.einsum("tcj,tc,ocj->to", q, d.astype(np.float64), weights - mins[..., None])
    return expected + s.astype(np.float64) @ mins.T


@pytest.mark.parametrize("rows", [6, 21])
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda t: t.name)
def test_chunk_sum_matmul(qtype: GGMLQuantizationType, rows: int):
    """The VNNI kernels of mlcc's order (gguf-fast) equal llama.cpp's 8-bit activations times the weights:
    each chunk's integer sum exact, scaled once (Q4_1/Q5_1's mins times the activations' float16 sums)."""
    from compiler.targets import _host_llvm
    from tir_kernels.matmul_llamacpp import chunk_sum_rows
    from tir_kernels.repack import group_rows
    from tir_kernels.simd import has_vnni

    target = _host_llvm()
    if not has_vnni(target):
        pytest.skip("the chunk-sum kernels need an x86 CPU with AVX-512 VNNI or AVX-VNNI")
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    cols = 512
    rng = np.random.default_rng(qtype.value + rows)
    raw = rng.integers(0, 256, size=(rows, cols // block, block_bytes), dtype=np.uint8)
    for field in FLOAT16_FIELDS[qtype]:
        raw[..., field + 1] &= 0xBB
    kernel = chunk_sum_rows(qtype, cols, rows).kernel.with_attr("global_symbol", "k")
    fn = tvm.compile(tvm.IRModule({"k": kernel}), target=target)
    data = tvm.runtime.tensor(group_rows(raw.reshape(rows, -1), qtype))
    # one token (decode), fewer than 4, quads and a remainder, more than a token block (LANE_ACTIVATION_BYTES)
    for tokens in (1, 3, 11, 600):
        x = rng.standard_normal((tokens, cols)).astype(np.float32)
        x[tokens // 2, :64] = 0  # all-zero blocks have scale 0
        expected = _chunk_sum_expected(raw, qtype, x)
        out = tvm.runtime.tensor(np.zeros((tokens, rows), np.float32))
        fn["k"](tvm.runtime.tensor(x), data, out)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(("qtype", "rows"), [(Q.Q4_0, 21), (Q.Q4_1, 6), (Q.Q5_0, 40), (Q.Q5_1, 21), (Q.Q8_0, 24)])
def test_amx_chunk_sum_matmul(qtype: GGMLQuantizationType, rows: int):
    """The AMX prefill kernels give the VNNI chunk-sum kernel's bits for every token count (a token's numbers do
    not depend on how many share its batch), an odd count of row groups and rows past a tile's 16 included."""
    from tir_kernels.matmul_amx import TILE_TOKENS, amx_chunk_sum_rows
    from tir_kernels.matmul_llamacpp import chunk_sum_rows
    from tir_kernels.repack import group_rows

    target = _amx_target()
    cols = 384
    rng = np.random.default_rng(qtype.value + rows)
    raw = _random_rows(qtype, rows, cols, rng)
    data = tvm.runtime.tensor(group_rows(raw.reshape(rows, -1), qtype))
    kernels = {"amx": amx_chunk_sum_rows(qtype, cols, rows).kernel, "vnni": chunk_sum_rows(qtype, cols, rows).kernel}
    fn = tvm.compile(tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in kernels.items()}), target=target)
    # decode (VNNI), one tile, tiles and a remainder (the last tile overlapping), many tiles
    for tokens in (3, TILE_TOKENS, 2 * TILE_TOKENS + 5, 200):
        x = rng.standard_normal((tokens, cols)).astype(np.float32)
        x[tokens // 2, :64] = 0  # all-zero blocks have scale 0
        out = {k: tvm.runtime.tensor(np.zeros((tokens, rows), np.float32)) for k in kernels}
        for name in kernels:
            fn[name](tvm.runtime.tensor(x), data, out[name])
        np.testing.assert_array_equal(out["amx"].numpy().view(np.uint32), out["vnni"].numpy().view(np.uint32))
        expected = _chunk_sum_expected(raw, qtype, x)
        np.testing.assert_allclose(out["amx"].numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(("qtype", "rows"), [(Q.Q4_K, 24), (Q.Q4_K, 40), (Q.Q6_K, 40)])
def test_amx_super_block_matmul(qtype: GGMLQuantizationType, rows: int):
    """gguf-fast's Q4_K and Q6_K on AMX give the bits of llama.cpp's order that they follow for every token (Q4_K
    the GEMV's, Q6_K the tiled matmul's: what runs for fewer than 16 tokens), an odd count of row groups
    included; and those are the product of the weights."""
    from tir_kernels.matmul_amx import TILE_TOKENS, amx_super_rows
    from tir_kernels.matmul_llamacpp_kquants import kquant_rows
    from tir_kernels.repack import group_rows
    from tir_kernels.simd import vector_registers

    target = _amx_target()
    cols = 512
    rng = np.random.default_rng(rows)
    raw = _random_rows(qtype, rows, cols, rng)
    weights = dequantize(raw.reshape(rows, -1), qtype).reshape(rows, cols)
    data = tvm.runtime.tensor(group_rows(raw.reshape(rows, -1), qtype))
    registers = vector_registers(target)
    kernels = {
        "amx": amx_super_rows(qtype, cols, rows, registers).kernel,
        "vnni": kquant_rows(qtype, cols, rows, True, registers, one_order=True).kernel,
    }
    fn = tvm.compile(tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in kernels.items()}), target=target)
    # decode, one tile, an odd count of tiles (the last overlapping, its pair a duplicate), many tiles
    for tokens in (3, TILE_TOKENS, 2 * TILE_TOKENS + 5, 200):
        x = rng.standard_normal((tokens, cols)).astype(np.float32)
        x[tokens // 2, :256] = 0  # an all-zero super-block has scale 0
        out = {k: tvm.runtime.tensor(np.zeros((tokens, rows), np.float32)) for k in kernels}
        for name in kernels:
            fn[name](tvm.runtime.tensor(x), data, out[name])
        np.testing.assert_array_equal(out["amx"].numpy().view(np.uint32), out["vnni"].numpy().view(np.uint32))
        expected = _quantized_activations(x, qtype) @ weights.T
        np.testing.assert_allclose(out["amx"].numpy(), expected, rtol=1e-2, atol=1e-3 * np.abs(expected).max())


@pytest.mark.parametrize("qtype", sorted({*GROUP_LAYOUTS, *SUPER_LAYOUTS}, key=lambda t: t.value), ids=lambda t: t.name)
def test_a_tied_embedding_reads_its_rows_from_the_output_heads_groups(qtype: GGMLQuantizationType):
    """A tied embedding stored as its int8 output head stores it (8 rows to a group, llama.cpp's order) decodes
    the file's very values: Q4_0, Q4_1 and Q8_0 through the byte order of that layout (it only moves bytes),
    Q4_K and Q6_K from the super-block layout; the 5-bit types' layout re-encodes their high bits (no order)."""
    from quant_schemes.gguf_native import byte_order
    from tir_kernels.matmul_float import grouped_gather, super_gather
    from tir_kernels.repack import group_rows

    block = GGML_QUANT_SIZES[qtype][0]
    rows, cols = 13, 2 * max(block, 32)  # a last group of 5 rows
    raw = _random_rows(qtype, rows, cols, np.random.default_rng(qtype.value)).reshape(rows, -1)
    grouped = group_rows(raw, qtype)
    order = byte_order(lambda r: group_rows(r, qtype), raw.shape[1])
    ids = np.array([12, 0, 7, 8, 3], np.int32)
    args = [te.placeholder(ids.shape, "int32", name="ids"), te.placeholder(grouped.shape, "uint8", name="data")]
    inputs = [ids, grouped]
    if qtype in SUPER_LAYOUTS:
        assert order is None
        out = super_gather(qtype, cols, "float32")(*args)
    elif qtype in (Q.Q5_0, Q.Q5_1):
        assert order is None
        return
    else:
        args.append(te.placeholder(order.shape, "int32", name="order"))
        inputs.append(order)
        out = grouped_gather(BlockFormat(qtype), cols, "float32")(*args)
    fn = tvm.compile(te.create_prim_func([*args, out]), target="llvm")
    result = tvm.runtime.tensor(np.zeros((len(ids), cols), np.float32))
    fn(*(tvm.runtime.tensor(a) for a in inputs), result)
    expected = dequantize(raw, qtype).reshape(rows, cols)[ids]
    np.testing.assert_array_equal(result.numpy(), expected)


def _with_embedding(source, out, blocks: np.ndarray, qtype: GGMLQuantizationType, head: bool):
    """`source` (a GGUF file) with token_embd.weight replaced by `blocks` of `qtype`, and with `head` an output
    head of the same blocks (untied) instead of the tie."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(str(source))
    writer = GGUFWriter(str(out), str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            array = field.types[0] == GGUFValueType.ARRAY
            writer.add_key_value(field.name, field.contents(), field.types[0], field.types[-1] if array else None)
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            for name in ["token_embd.weight", "output.weight"] if head else ["token_embd.weight"]:
                writer.add_tensor(name, blocks, raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, np.asarray(t.data).reshape(t.shape.tolist()[::-1]), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.parametrize(
    "qtype", [Q.Q6_K, pytest.param(Q.Q4_K, marks=pytest.mark.slow), pytest.param(Q.Q8_0, marks=pytest.mark.slow)]
)
def test_a_tied_embedding_stored_once_gives_the_untied_twins_logits(qtype, tmp_path):
    """A GGUF file whose head is tied to a K-quant (or Q8_0) embedding compiles to one stored matrix (the head's
    grouped layout, read by the gather), with the same logits, bit for bit, at every position as the same model
    with the head written out as a second copy (the file's rows for the gather, the head's own matrix)."""
    from gguf_convert import write_gguf
    from tiny_models import make_model

    from compiler.compile import compile_model
    from runtime import Engine

    folder = make_model("llama", tmp_path / "hf", hidden_size=256, intermediate_size=512, tie_word_embeddings=True)
    base = write_gguf(folder, tmp_path / "base.gguf")
    blocks = _random_rows(qtype, 384, 256, np.random.default_rng(1)).reshape(384, -1)  # the tokenizer's 384 rows
    logits, stored = [], []
    for head in (False, True):
        gguf_file = _with_embedding(base, tmp_path / f"{head}.gguf", blocks, qtype, head)
        manifest = compile_model(str(gguf_file), tmp_path / f"art-{head}", progress=lambda _: None)
        stored.append(manifest.weights.get("aliases"))
        logits.append(Engine(tmp_path / f"art-{head}", max_batch_size=1).prompt_logits(list(range(3, 40))))
    assert stored == [{"output.q_data": "token_embd.q_data"}, None]
    np.testing.assert_array_equal(logits[0], logits[1])
