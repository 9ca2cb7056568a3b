"""A float16 KV cache under float32 activations (`mlcc compile --kv-dtype float16`): close to transformers in
prefill and decode, with sliding windows and soft-capping, and as deterministic as a float32 cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_determinism import TEXT, check_deterministic
from test_models import PROMPTS, load_reference, reference_logits
from tiny_models import make_model

from artifacts.errors import MlccError
from compiler.compile import compile_model
from mlcc_cli import main
from runtime import Engine, SamplingParams
from runtime.engine import CANONICAL_CHUNK

TOKENS = 12


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def model_pair(request, tmp_path_factory) -> tuple[Path, Path]:
    """(HF folder, its artifact with a float16 cache) of a tiny Llama whose context holds several canonical
    chunks, and of a tiny Gemma 2 (sliding-window layers, soft-capped scores)."""
    folder = tmp_path_factory.mktemp(f"kv16-{request.param}")
    hf = make_model(request.param, folder / "hf", max_position_embeddings=4 * CANONICAL_CHUNK)
    compile_model(str(hf), folder / "art", quant="q0f32", kv_dtype="float16", progress=lambda _: None)
    return hf, folder / "art"


def test_the_manifest_says_float16(model_pair):
    manifest = json.loads((model_pair[1] / "mlcc-manifest.json").read_text())
    assert manifest["kv_cache"]["dtype"] == "float16"
    assert manifest["quant"]["dtype"] == "float32"


def test_prefill_and_decode_close_to_transformers(model_pair):
    """Prefill logits within float16's rounding of transformers'; each greedy token of a decode (which reads
    the float16 pages) at most a rounding error below the reference's best at its step."""
    hf, art = model_pair
    model, tokenizer = load_reference(hf)
    engine = Engine(art)
    prompts = [tokenizer(p).input_ids for p in [*PROMPTS, TEXT * 2]]
    for row, ids in zip(engine.prefill_logits(prompts), prompts):
        ref = reference_logits(model, ids)
        assert np.abs(row - ref).max() <= 0.01 * np.abs(ref).max()
        assert row.argmax() == ref.argmax()
    results = engine.generate_ids(prompts, SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True))
    for result, ids in zip(results, prompts):
        assert len(result.token_ids) == TOKENS
        for step, token in enumerate(result.token_ids):
            ref = reference_logits(model, ids + result.token_ids[:step])
            assert ref[token] >= ref.max() - 0.01 * np.abs(ref).max(), (step, token, int(ref.argmax()))


@pytest.mark.parametrize("model_pair", ["llama"], indirect=True)  # (sliding windows keep no prefixes to reuse)
def test_deterministic_whatever_is_cached_chunked_or_batched(model_pair):
    check_deterministic(model_pair[1], TEXT * 4, [TEXT[::-1] * 2, "Hello! " * 30, TEXT[40:] * 3])


def test_an_unknown_kv_dtype_is_a_one_line_error(tmp_path):
    with pytest.raises(MlccError, match="unsupported KV cache type 'int8'"):
        compile_model("unused", tmp_path / "out", kv_dtype="int8")
    result = CliRunner().invoke(main, ["compile", "--model", "x", "--kv-dtype", "bf16", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "'bf16' is not one of 'float16', 'float32'" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()
