"""Mixtral (sparse mixture of experts) from tiny random HF checkpoints against transformers: every prompt
position's logits, 16 greedy tokens, a batch equal to each sequence alone, q4 against transformers on the
dequantized weights, and the same weights as a GGUF file equal to the HF build."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf import quants as gguf_quants
from safetensors.numpy import load_file, save_file
from tiny_models import make_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from artifacts.errors import MlccError
from compiler.experts import stack_expert_shapes, stack_experts
from model_defs.mixtral import map_hf_name
from quant_schemes import get_scheme
from runtime import Engine, SamplingParams

SENTENCE = "def main():\n    print('hello, world')\n    return 42\nThe quick brown fox jumps over the lazy dog."
PROMPTS = ["Hello! How are you today?", "Paris", SENTENCE, SENTENCE * 3]  # 13, 3, 48 and 142 tokens
TOLERANCE = 1e-4
Q4_0 = GGMLQuantizationType.Q4_0

# name -> (quant, config overrides): 4 experts with an intermediate size the quantization groups do not divide,
# and 8 experts with an odd one and a sliding window far shorter than the longer prompts.
VARIANTS = {
    "mixtral4-f32": ("q0f32", dict(num_local_experts=4, intermediate_size=72)),
    "mixtral8-f32": ("q0f32", dict(num_local_experts=8, intermediate_size=75, sliding_window=16)),
    "mixtral4-q4": ("q4", dict(num_local_experts=4, intermediate_size=72)),
}


@pytest.fixture(scope="module")
def mixtral(workdir):
    """(HF folder, artifact folder) of a variant, made and compiled on first use."""
    from compiler.compile import compile_model

    built: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in built:
            quant, overrides = VARIANTS[name]
            folder = make_model("mixtral", workdir / f"hf-{name}", **overrides)
            out = workdir / f"art-{name}"
            compile_model(str(folder), out, quant=quant, progress=lambda _: None)
            built[name] = folder, out
        return built[name]

    return get


@pytest.fixture(scope="module")
def mixtral_engine(mixtral):
    engines: dict[str, Engine] = {}

    def get(name: str) -> Engine:
        if name not in engines:
            engines[name] = Engine(mixtral(name)[1])
        return engines[name]

    return get


def reference(folder: Path):
    """transformers' MixtralSparseMoeBlock as written (its loop over experts), not a grouped-GEMM kernel."""
    model = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(folder)


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1
        )
    return out[0, len(ids) :].tolist()


def assert_matches_transformers(eng: Engine, model, tokenizer, tolerance: float, greedy: bool = True) -> None:
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    for prompt_ids in ids:
        with torch.no_grad():
            ref = model(torch.tensor([prompt_ids])).logits[0].numpy()  # [s, vocab]
        assert np.abs(eng.prompt_logits(prompt_ids) - ref).max() <= tolerance
    if greedy:
        results = eng.generate_ids(ids, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        for result, prompt_ids in zip(results, ids):
            assert result.token_ids == reference_greedy(model, prompt_ids, 16)


@pytest.mark.parametrize("variant", ["mixtral4-f32", "mixtral8-f32"])
def test_every_position_and_greedy_match_transformers(variant, mixtral, mixtral_engine):
    model, tokenizer = reference(mixtral(variant)[0])
    assert model.config.num_experts_per_tok == 2
    assert_matches_transformers(mixtral_engine(variant), model, tokenizer, TOLERANCE)


def test_prompts_route_to_every_expert_and_pass_the_window(mixtral):
    """The checks above are worth something only if tokens spread over all experts, in every layer, and the
    longer prompts pass the sliding window."""
    model, tokenizer = reference(mixtral("mixtral8-f32")[0])
    ids = tokenizer(PROMPTS[-1]).input_ids
    assert len(ids) > 2 * model.config.sliding_window
    with torch.no_grad():
        router_logits = model(torch.tensor([ids]), output_router_logits=True).router_logits
    for layer_logits in router_logits:  # [tokens, experts]
        chosen = layer_logits.topk(2, dim=-1).indices.flatten().tolist()
        assert set(chosen) == set(range(model.config.num_local_experts))


@pytest.mark.parametrize("variant", ["mixtral4-f32", "mixtral8-f32"])
def test_batch_of_four_equals_each_alone(variant, mixtral_engine):
    eng = mixtral_engine(variant)
    ids = [eng.tokenizer.encode(p) for p in PROMPTS]
    together = eng.prefill_logits(ids)
    for row, prompt_ids in zip(together, ids):
        np.testing.assert_allclose(row, eng.prefill_logits([prompt_ids])[0], atol=1e-5)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    batched = eng.generate_ids(ids, params)
    alone = [eng.generate_ids([i], params)[0] for i in ids]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]


def dequantized_copy(folder: Path, out: Path, quant: str) -> Path:
    """`folder` with every matrix but the router quantized as `quant` stores it and dequantized: the weights a
    build of `folder` with `quant` computes with."""
    scheme = get_scheme(quant)
    shutil.copytree(folder, out, dirs_exist_ok=True)
    tensors = {}
    for hf_name, w in load_file(str(folder / "model.safetensors")).items():
        role = re.sub(r"(_exps)?\.weight(\[\d+\])?$", "", map_hf_name(hf_name) or "")
        if w.ndim == 2 and not role.endswith("ffn_gate_inp"):
            fmt = scheme.format_for(role)
            w = fmt.dequantize(fmt.quantize(w), w.shape[1])
        tensors[hf_name] = w
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_q4_matches_transformers_on_its_dequantized_weights(mixtral, mixtral_engine, workdir):
    """Experts in mlcc's q4 groups (down_proj's rows zero-padded to whole groups), router in float32."""
    folder, _ = mixtral("mixtral4-q4")
    model, tokenizer = reference(dequantized_copy(folder, workdir / "hf-mixtral4-q4-dequantized", "q4"))
    assert_matches_transformers(mixtral_engine("mixtral4-q4"), model, tokenizer, 1e-3, greedy=False)


def test_experts_stack_in_order_and_missing_ones_are_one_line_errors():
    rng = np.random.default_rng(0)
    parts = {i: rng.standard_normal((3, 5)).astype(np.float32) for i in range(4)}
    named = [("a.weight", np.zeros(2))] + [(f"x.weight[{i}]", parts[i]) for i in (2, 0, 3, 1)]
    stacked = dict(stack_experts(iter(named), 4))
    np.testing.assert_array_equal(stacked["x.weight"], np.stack([parts[i] for i in range(4)]))
    assert set(stacked) == {"a.weight", "x.weight"}
    with pytest.raises(MlccError, match="has 3 of the 4 experts of x.weight"):
        list(stack_experts(iter(named[:-1]), 4))
    with pytest.raises(MlccError, match="has expert 3, but the model config has 3 experts"):
        list(stack_experts(iter(named), 3))
    shapes = {f"x.weight[{i}]": (f"experts.{i}.w1", (3, 5)) for i in range(3)}
    assert stack_expert_shapes(shapes) == {"x.weight": ("experts.0.w1", (3, 3, 5))}


def _permute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Q/K rows in the interleaved RoPE order llama.cpp's converter writes (LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_mixtral_gguf(folder: Path, out: Path, expert_type: GGMLQuantizationType = GGMLQuantizationType.F32) -> Path:
    """An HF Mixtral checkpoint as llama.cpp's convert_hf_to_gguf.py writes it (architecture `llama` with
    `expert_count`, experts stacked into 3-D `ffn_*_exps`), the experts in `expert_type`, the rest float32."""
    cfg = json.loads((folder / "config.json").read_text())
    heads, kv_heads, layers = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    writer = GGUFWriter(str(out), "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    writer.add_expert_count(cfg["num_local_experts"])
    writer.add_expert_used_count(cfg["num_experts_per_tok"])
    tensors = load_file(str(folder / "model.safetensors"))
    plain = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for name, gguf_name in plain.items():
        writer.add_tensor(gguf_name, tensors[name])
    for i in range(layers):
        hf = f"model.layers.{i}"
        writer.add_tensor(f"blk.{i}.attn_norm.weight", tensors[f"{hf}.input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", tensors[f"{hf}.post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute_rope_rows(tensors[f"{hf}.self_attn.q_proj.weight"], heads))
        writer.add_tensor(
            f"blk.{i}.attn_k.weight", _permute_rope_rows(tensors[f"{hf}.self_attn.k_proj.weight"], kv_heads)
        )
        writer.add_tensor(f"blk.{i}.attn_v.weight", tensors[f"{hf}.self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", tensors[f"{hf}.self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate_inp.weight", tensors[f"{hf}.block_sparse_moe.gate.weight"])
        for hf_role, role in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            experts = np.stack(
                [
                    tensors[f"{hf}.block_sparse_moe.experts.{e}.{hf_role}.weight"]
                    for e in range(cfg["num_local_experts"])
                ]
            )  # [experts, out, in]
            if expert_type == GGMLQuantizationType.F32:
                writer.add_tensor(f"blk.{i}.ffn_{role}_exps.weight", experts)
            else:
                packed = gguf_quants.quantize(experts, expert_type)
                writer.add_tensor(f"blk.{i}.ffn_{role}_exps.weight", packed, raw_dtype=expert_type)
    _add_tokenizer(writer, folder)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_tokenizer(writer: GGUFWriter, folder: Path) -> None:
    """The tiny models' byte-level BPE tokenizer as llama.cpp's `gpt2` vocabulary."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    vocab = {**{i: t for t, i in tok["model"]["vocab"].items()}, **added}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list([vocab[i] for i in range(len(vocab))])
    writer.add_token_types([3 if i in added else 1 for i in range(len(vocab))])  # control, normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)


def test_the_same_weights_as_gguf_equal_the_hf_build(mixtral, mixtral_engine, workdir):
    """llama.cpp's layout (3-D experts, `llama` architecture with expert_count, interleaved Q/K rows) compiles to
    the model the HF checkpoint compiles to."""
    from compiler.compile import compile_model

    folder, _ = mixtral("mixtral4-f32")
    path = write_mixtral_gguf(folder, workdir / "mixtral4-f32.gguf")
    out = workdir / "art-mixtral4-f32-gguf"
    manifest = compile_model(str(path), out, quant="gguf-f32", progress=lambda _: None)
    assert manifest.arch == "mixtral"
    from_gguf, from_hf = Engine(out), mixtral_engine("mixtral4-f32")
    for prompt in PROMPTS:
        ids = from_hf.tokenizer.encode(prompt)
        assert from_gguf.tokenizer.encode(prompt) == ids
        np.testing.assert_allclose(from_gguf.prompt_logits(ids), from_hf.prompt_logits(ids), atol=2e-5)


def test_gguf_block_type_experts_match_transformers_on_their_dequantized_weights(workdir):
    """Experts kept in the file's Q4_0 blocks, decoded in the grouped kernels: equal to transformers on the same
    blocks dequantized (gguf-f32); with 8-bit activations (the default build on an AVX2 CPU: the experts go
    through the dense layers' integer kernels, tests/test_expert_kernels.py) close to it."""
    from compiler.compile import compile_model
    from compiler.targets import _host_llvm
    from tir_kernels.simd import has_avx2

    folder = make_model("mixtral", workdir / "hf-mixtral4-blocks", num_local_experts=4, intermediate_size=96)
    path = write_mixtral_gguf(folder, workdir / "mixtral4-q4_0.gguf", Q4_0)
    dequantized = workdir / "hf-mixtral4-blocks-dequantized"
    shutil.copytree(folder, dequantized)
    tensors = load_file(str(folder / "model.safetensors"))
    for name, w in tensors.items():
        if ".experts." in name:
            tensors[name] = gguf_quants.dequantize(gguf_quants.quantize(w, Q4_0), Q4_0)
    save_file(tensors, str(dequantized / "model.safetensors"), metadata={"format": "pt"})
    model, tokenizer = reference(dequantized)
    out = workdir / "art-mixtral4-q4_0"
    compile_model(str(path), out, quant="gguf-f32", progress=lambda _: None)
    assert_matches_transformers(Engine(out), model, tokenizer, TOLERANCE, greedy=False)
    out = workdir / "art-mixtral4-q4_0-default"
    manifest = compile_model(str(path), out, progress=lambda _: None)  # 8-bit activations where they apply
    assert manifest.quant["activations"] == ("q8" if has_avx2(_host_llvm()) else "f32")
    eng = Engine(out)
    checked = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            ref = model(torch.tensor([ids]), output_router_logits=True)
        logits = ref.logits[0].numpy()
        # 8-bit activations move the router's input a little: where its 2nd and 3rd choices nearly tie, the
        # route may flip and that token's logits differ by much; every other position is close.
        probs = [torch.softmax(r.reshape(len(ids), -1), -1).sort(-1, descending=True).values for r in ref.router_logits]
        clear = np.all([(p[:, 1] - p[:, 2]).numpy() > 0.02 for p in probs], axis=0)
        error = np.abs(eng.prompt_logits(ids) - logits).max(-1)
        assert error[clear].max() <= 0.05 * np.abs(logits).max()
        checked += clear.sum()
    assert checked >= 0.5 * sum(len(tokenizer(p).input_ids) for p in PROMPTS)


def test_experts_no_token_is_routed_to_are_never_used(mixtral, workdir):
    """A one-token prompt routes to 2 of 8 experts per layer: with every other expert's weights NaN, the logits
    are still transformers' (a kernel multiplying all experts and weighting the unchosen by 0 would give NaN)."""
    from compiler.compile import compile_model

    folder, _ = mixtral("mixtral8-f32")
    model, _ = reference(folder)
    ids = [0]
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_router_logits=True)
    chosen = [set(layer.topk(2, dim=-1).indices.flatten().tolist()) for layer in out.router_logits]
    poisoned = workdir / "hf-mixtral8-poisoned"
    shutil.copytree(folder, poisoned)
    tensors = load_file(str(folder / "model.safetensors"))
    poisoned_count = 0
    for name in tensors:
        expert = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\..*", name)
        if expert and int(expert.group(2)) not in chosen[int(expert.group(1))]:
            tensors[name] = np.full_like(tensors[name], np.nan)
            poisoned_count += 1
    assert poisoned_count == len(chosen) * 6 * 3  # 6 unchosen experts per layer, 3 matrices each
    save_file(tensors, str(poisoned / "model.safetensors"), metadata={"format": "pt"})
    art = workdir / "art-mixtral8-poisoned"
    compile_model(str(poisoned), art, quant="q0f32", progress=lambda _: None)
    logits = Engine(art).prompt_logits(ids)
    assert np.abs(logits - out.logits[0].numpy()).max() <= TOLERANCE
