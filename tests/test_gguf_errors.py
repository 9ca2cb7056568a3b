"""Bad GGUF input gets one line on stderr and a non-zero exit, and leaves no artifact behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from test_cli import assert_one_line_error, mlcc


def write_gguf(path: Path, arch: str, qtype: GGMLQuantizationType = GGMLQuantizationType.F32) -> Path:
    """A tiny GGUF: llama-style metadata, a 2-token gpt2 vocabulary and one 32x32 tensor of `qtype`."""
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.add_token_merges([])
    if qtype == GGMLQuantizationType.F32:
        writer.add_tensor("token_embd.weight", np.zeros((2, 32), np.float32))
    else:  # raw bytes of the right size: the type alone must be refused, before anything is decoded
        from gguf import GGML_QUANT_SIZES

        block, block_bytes = GGML_QUANT_SIZES[qtype]
        raw = np.zeros((32, 256 // block * block_bytes), np.uint8)
        writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_gguf_architecture(tmp_path):
    gguf = write_gguf(tmp_path / "m.gguf", "rwkv6")
    proc = mlcc("compile", "--model", str(gguf), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "unsupported GGUF architecture 'rwkv6'", "llama")
    assert not (tmp_path / "out").exists()


def test_unsupported_gguf_quant_type(tmp_path):
    gguf = write_gguf(tmp_path / "m.gguf", "llama", GGMLQuantizationType.Q2_K)
    proc = mlcc("compile", "--model", str(gguf), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "Q2_K is not supported")
    assert not (tmp_path / "out").exists()


def test_truncated_and_corrupted_gguf(tmp_path):
    gguf = write_gguf(tmp_path / "m.gguf", "llama")
    data = gguf.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    assert_one_line_error(mlcc("compile", "--model", str(tmp_path / "cut.gguf"), "-o", str(tmp_path / "o")), "GGUF")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    assert_one_line_error(mlcc("compile", "--model", str(tmp_path / "bad.gguf"), "-o", str(tmp_path / "o")), "GGUF")
    (tmp_path / "nope.gguf").write_bytes(b"not a gguf at all")
    assert_one_line_error(mlcc("compile", "--model", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "o")), "GGUF")
    assert_one_line_error(mlcc("compile", "--model", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "o")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "cut.gguf", "m.gguf", "nope.gguf"]
