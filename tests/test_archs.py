"""Each registered architecture from a tiny random HF checkpoint, compiled q0f32, against transformers:
logits at every prompt position, 16 greedy tokens, and a batch of 4 equal to each sequence alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from gguf_convert import write_gguf
from transformers import AutoModelForCausalLM, DynamicCache, Gemma3TextConfig, PreTrainedTokenizerFast
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

from artifacts import MANIFEST_NAME
from artifacts.errors import MlccError
from compiler.targets import TargetRequest, resolve_target, strict_float
from model_defs import get_arch, markdown_table
from quant_schemes import get_scheme
from runtime import Engine, SamplingParams
from tir_kernels.rope import neox_rotate_kernel, neox_tables_kernel

SENTENCE = "def main():\n    print('hello, world')\n    return 42\nThe quick brown fox jumps over the lazy dog."
# Token counts with the tiny tokenizer: 13, 3, 48 and 142 (the tiny Phi-3 switches RoPE factors beyond 64).
PROMPTS = ["Hello! How are you today?", "Paris", SENTENCE, SENTENCE * 3]
CROSSING = SENTENCE + " Paris, 0123456789"  # 58 tokens: passes 64 while decoding 16
TOLERANCE = 1e-4


def tolerance(ref: np.ndarray) -> float:
    """1e-4, growing with logits beyond 10 in size: float32 error scales with activations (the tiny tied Gemma's
    logits reach ~38, its max error 2e-4, mostly the vectorized tanh of GeLU, 1e-6 relative)."""
    return TOLERANCE * max(1.0, float(np.abs(ref).max()) / 10)


def reference(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return model, PreTrainedTokenizerFast.from_pretrained(folder)


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1
        )
    return out[0, len(ids) :].tolist()


ARCH_VARIANTS = [
    "phi3-f32",
    "phi-f32",
    "gemma-f32",
    "gemma2-f32",
    "gemma3-f32",
    "gemma3-linear-f32",
    *(
        pytest.param(v, marks=pytest.mark.slow)
        for v in ("phi3-odd-f32", "phi3-window-f32", "phi-odd-f32", "gemma2-odd-f32")
    ),
]


@pytest.fixture(scope="session")
def arch_engine(artifact):
    """Engines of the variants. LongRoPE rotates a whole sequence by its length in the call, so KV computed for a
    shorter prompt is not what a fresh transformers run of a longer one has: no prefix reuse there."""
    engines: dict[str, Engine] = {}

    def get(name: str) -> Engine:
        if name not in engines:
            folder = artifact(name)
            config = json.loads((folder / MANIFEST_NAME).read_text())["model_config"]
            longrope = config.get("rope_scaling", {}).get("rope_type") == "longrope"
            engines[name] = Engine(folder, prefix_cache=not longrope)
        return engines[name]

    return get


@pytest.mark.parametrize("variant", ARCH_VARIANTS)
def test_every_position_and_greedy_match_transformers(variant, hf_folder, arch_engine):
    model, tokenizer = reference(hf_folder(variant))
    eng = arch_engine(variant)
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    assert [eng.tokenizer.encode(p) for p in PROMPTS] == ids
    for prompt_ids in ids:
        with torch.no_grad():
            ref = model(torch.tensor([prompt_ids])).logits[0].numpy()  # [s, vocab]
        assert np.abs(eng.prompt_logits(prompt_ids) - ref).max() <= tolerance(ref)
    results = eng.generate_ids(ids, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    for result, prompt_ids in zip(results, ids):
        assert result.token_ids == reference_greedy(model, prompt_ids, 16)


@pytest.mark.parametrize("variant", ARCH_VARIANTS)
def test_batch_of_four_equals_each_alone(variant, arch_engine):
    eng = arch_engine(variant)
    ids = [eng.tokenizer.encode(p) for p in PROMPTS]
    together = eng.prefill_logits(ids)
    for row, prompt_ids in zip(together, ids):
        np.testing.assert_allclose(row, eng.prefill_logits([prompt_ids])[0], atol=1e-5)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    batched = eng.generate_ids(ids, params)
    alone = [eng.generate_ids([i], params)[0] for i in ids]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]


@pytest.fixture(scope="session")
def gguf_engine(workdir, hf_folder):
    """Engine of a variant's checkpoint written as GGUF the way llama.cpp's converter writes it, compiled q0f32
    or, with quant None, in the default for GGUF files (`gguf`: the file's own types, llama.cpp's arithmetic)."""
    from compiler.compile import compile_model

    engines: dict[tuple[str, str | None], Engine] = {}

    def get(name: str, quant: str | None = "q0f32") -> Engine:
        if (name, quant) not in engines:
            gguf = workdir / f"{name}.gguf"
            if not gguf.is_file():
                write_gguf(hf_folder(name), gguf)
            out = workdir / f"art-gguf-{quant or 'default'}-{name}"
            compile_model(str(gguf), out, quant=quant, progress=lambda _: None)
            engines[name, quant] = Engine(out, prefix_cache=False)
        return engines[name, quant]

    return get


@pytest.mark.parametrize(
    "variant",
    [
        "phi3-f32",
        "gemma3-linear-f32",
        *(pytest.param(v, marks=pytest.mark.slow) for v in ("phi-f32", "gemma-f32", "gemma2-f32", "gemma3-gguf-f32")),
    ],
)
def test_gguf_build_equals_hf_build(variant, gguf_engine, arch_engine):
    """The GGUF file's names, metadata (Phi-3's LongRoPE factors as tensors, Gemma's folded norms, Gemma 3's linear
    RoPE scaling of the global layers) and vocabulary give the model and tokenizer the HF folder gives (Gemma 3's
    GGUF build computes in llama.cpp's order, so within float32 rounding, not bit for bit)."""
    hf, gguf = arch_engine(variant), gguf_engine(variant)
    ids = [hf.tokenizer.encode(p) for p in PROMPTS]
    assert [gguf.tokenizer.encode(p) for p in PROMPTS] == ids
    assert gguf.artifact.manifest.chat_template == hf.artifact.manifest.chat_template
    for prompt_ids in ids:
        ref = hf.prompt_logits(prompt_ids)
        np.testing.assert_allclose(gguf.prompt_logits(prompt_ids), ref, rtol=0, atol=tolerance(ref))
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert [r.token_ids for r in gguf.generate_ids(ids, params)] == [r.token_ids for r in hf.generate_ids(ids, params)]


@pytest.mark.parametrize(
    "variant",
    [
        "phi3-f32",
        "gemma2-f32",
        "gemma3-linear-f32",
        *(pytest.param(v, marks=pytest.mark.slow) for v in ("phi-f32", "gemma-f32")),
    ],
)
def test_gguf_default_numerics_stay_close_to_the_hf_build(variant, gguf_engine, arch_engine):
    """The default build of a GGUF file computes as llama.cpp does, which rounds K and V (its cache) and q and the
    attention weights (the operands of its float16 products) to float16, 2^-11 relative each. Through these tiny
    models that moves a prompt's logits by 0.04-0.31% of its largest one (measured); the bound, 1%, leaves a 3x
    margin and stays far below a real fault (without its RoPE scaling, Gemma 3's logits move by 28%). Top-1
    differs only where two logits nearly tie (1 of 206 positions at most, measured)."""
    hf, gguf = arch_engine(variant), gguf_engine(variant, None)
    if gguf.artifact.manifest.quant["numerics"] != "llama.cpp":
        pytest.skip("llama.cpp's numerics need AVX2")
    agree = total = 0
    for prompt in PROMPTS:
        ids = hf.tokenizer.encode(prompt)
        got, ref = gguf.prompt_logits(ids), hf.prompt_logits(ids)
        assert np.abs(got - ref).max() <= 0.01 * np.abs(ref).max()
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
    assert agree >= 0.97 * total


def test_gemma3_rope_scaling_from_gguf_and_hf():
    """Gemma 3 4B+: linear RoPE scaling of the global layers only, as llama.cpp's metadata and transformers'
    config (older top-level `rope_scaling` or per-layer-kind `rope_parameters`) state it; the 27B's query scale,
    which its GGUF file does not store."""
    gemma3 = get_arch("gemma3")
    meta = {
        "vocab_size": 384,
        "embedding_length": 64,
        "feed_forward_length": 96,
        "block_count": 6,
        "attention.head_count": 4,
        "attention.key_length": 32,
    }
    linear = {"rope_type": "linear", "factor": 8.0}
    for keys, scaling in [
        ({"rope.scaling.type": "linear", "rope.scaling.factor": 8.0}, linear),
        ({"rope.scale_linear": 8.0}, linear),  # older files; llama.cpp's default type is linear
        ({"rope.scaling.type": "none", "rope.scaling.factor": 8.0}, {}),  # llama.cpp never scales "none"
    ]:
        assert gemma3.config_from_gguf({**meta, **keys}, False).rope_scaling == scaling
    with pytest.raises(MlccError, match="unsupported RoPE scaling 'yarn'"):
        gemma3.config_from_gguf({**meta, "rope.scaling.type": "yarn", "rope.scaling.factor": 8.0}, False)
    big = {**meta, "embedding_length": 5376, "attention.head_count": 32, "attention.key_length": 128}
    for layers, scalar in [(48, 128), (62, 168)]:  # 12B: head_dim; 27B: hidden / heads
        scale = gemma3.config_from_gguf({**big, "block_count": layers}, False).query_scale
        assert scale == pytest.approx(scalar**-0.5, rel=1e-6)
    with pytest.raises(MlccError, match="Gemma 2 with RoPE scaling"):  # it would scale every layer
        get_arch("gemma2").config_from_gguf({**meta, "rope.scaling.factor": 8.0}, False)
    hf = dict(  # Gemma 3 4B's config.json, shrunk
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        rope_scaling=linear,
        sliding_window=1024,
        sliding_window_pattern=6,
    )
    config = gemma3.config_from_hf(hf)
    rotary = Gemma3RotaryEmbedding(Gemma3TextConfig(**hf))
    assert [config.is_sliding(i) for i in range(6)] == [True] * 5 + [False]
    for sliding, kind in [(True, "sliding_attention"), (False, "full_attention")]:
        expected = getattr(rotary, f"{kind}_inv_freq").numpy()
        np.testing.assert_allclose(config.rope(sliding).inv_freq, expected, rtol=1e-6)


@pytest.mark.parametrize("factor", [8.0, 3.0])
def test_scaled_neox_rope_is_ggml(factor: float):
    """The scaled RoPE of Gemma 3's global layers from GGUF gives ggml_rope_ext's numbers bit for bit with
    freq_scale = 1.0f / factor times each angle (3 is no power of 2: there the order of the products matters)."""
    from ggml_reference import rope_neox

    freq_scale = float(np.float32(1) / np.float32(factor))
    kernels = {"tables": neox_tables_kernel(32, 1e6, freq_scale), "rotate": neox_rotate_kernel(4, 32)}
    target = strict_float(resolve_target(TargetRequest())).target  # as a build in llama.cpp's numerics
    lib = tvm.compile(tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in kernels.items()}), target=target)
    x = np.random.default_rng(5).standard_normal((7, 4, 32)).astype(np.float32)
    positions = np.array([0, 1, 2, 17, 300, 511, 4000], np.int32)
    cos, sin = (tvm.runtime.tensor(np.zeros((7, 16), np.float32)) for _ in range(2))
    lib["tables"](tvm.runtime.tensor(positions), cos, sin)
    out = tvm.runtime.tensor(np.zeros_like(x))
    lib["rotate"](tvm.runtime.tensor(x), cos, sin, out)
    np.testing.assert_array_equal(out.numpy(), rope_neox(x, positions, 1e6, freq_scale))
    assert np.abs(out.numpy() - rope_neox(x, positions, 1e6)).max() > 0.1  # the scale is there


@pytest.mark.slow  # a compile each; the default suite has q4 on the llama-family models (test_models.py)
@pytest.mark.parametrize("arch", ["phi3", "phi", "gemma", "gemma2", "gemma3"])
def test_q4_matches_transformers_on_its_dequantized_weights(arch, hf_folder, arch_engine):
    """A q4 build computes what transformers computes with each matrix quantized and dequantized as the scheme
    stores it (fused matrices such as Phi-3's qkv included); the tiny random models' argmax against the float
    weights agrees only in 30-90% of positions, the quantization noise itself."""
    variant = f"{arch}-q4"
    model, tokenizer = reference(hf_folder(variant))
    scheme, names = get_scheme("q4"), get_arch(arch).map_hf_name
    with torch.no_grad():
        if model.config.tie_word_embeddings:  # the artifact quantizes its own copy of a tied head
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        for name, p in model.named_parameters():
            if p.ndim == 2:
                fmt = scheme.format_for(names(name).removesuffix(".weight"))
                w = p.numpy()
                p.copy_(torch.from_numpy(fmt.dequantize(fmt.quantize(w), w.shape[1])))
    eng = arch_engine(variant)
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(eng.prompt_logits(ids) - ref).max() <= 1e-3


def test_phi3_longrope_prompts_on_both_sides_of_the_switch(hf_folder):
    """The tiny Phi-3's prompts lie on both sides of original_max_position_embeddings, so both factor sets run."""
    model, tokenizer = reference(hf_folder("phi3-f32"))
    original = model.config.rope_parameters["original_max_position_embeddings"]
    lengths = [len(tokenizer(p).input_ids) for p in PROMPTS]
    assert min(lengths) < original < max(lengths)
    assert all(not n < original < n + 15 for n in lengths)  # generate() recomputes the cache at the switch


def test_phi3_decode_across_the_longrope_switch(hf_folder, arch_engine):
    """Decoding past original_max_position_embeddings: each step rotates with the factors of its sequence length,
    earlier keys stay as they were, as transformers' forward with a cache does. (Its generate() instead
    recomputes the whole cache once at the switch; mlcc's engine does not.)"""
    model, tokenizer = reference(hf_folder("phi3-f32"))
    ids = tokenizer(CROSSING).input_ids
    assert len(ids) < model.config.rope_parameters["original_max_position_embeddings"] < len(ids) + 15
    expected, cache = [], DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits
        for _ in range(16):
            expected.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([expected[-1:]]), past_key_values=cache, use_cache=True).logits
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert arch_engine("phi3-f32").generate_ids([ids], params)[0].token_ids == expected


def test_readme_table_is_the_registry():
    assert markdown_table() in (Path(__file__).parent.parent / "README.md").read_text()
