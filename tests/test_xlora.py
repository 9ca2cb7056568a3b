"""X-LoRA models in adapter slots: a q0f32 build with `--lora-slots`, PEFT X-LoRA folders loaded at run time. Each
model's logits equal PEFT's XLoraModel at every position and its greedy tokens XLoraModel.generate's; a batch
mixing an X-LoRA model, a plain adapter and the base model equals each request alone."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")

from tiny_models import assert_batch_equals_alone, make_adapter, make_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from artifacts.errors import MlccError  # noqa: E402
from runtime import Engine, SamplingParams  # noqa: E402

PROMPTS = ["Once upon a time there was", "def main():\n    print("]
TOLERANCE = 1e-4
CLASSIFIER = "base_model.internal_xlora_classifier."

# name -> XLoraConfig settings besides the experts (with a classifier of random nonzero weights)
SETTINGS = {
    "dense": dict(xlora_depth=1),
    "deep-layerwise": dict(
        xlora_depth=2, xlora_size=16, layerwise_scalings=True, softmax_temperature=0.5, global_scaling_weight=1.5
    ),
    "top-k": dict(xlora_depth=1, layerwise_scalings=True, top_k_lora=2, enable_softmax=False, enable_softmax_topk=True),
    "scaling-pass": dict(xlora_depth=1, scaling_pass_value=0.3, softmax_temperature=2.0),
}


@pytest.fixture(scope="module")
def experts(hf_folder, tmp_path_factory) -> tuple[Path, list[Path]]:
    """(base folder, three PEFT LoRA experts over different modules and ranks, together all of a block's linears)."""
    base = hf_folder("llama-f32")
    root = tmp_path_factory.mktemp("xlora-experts")
    return base, [
        make_adapter(base, root / "e0", 11, r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        make_adapter(base, root / "e1", 12, r=8, lora_alpha=5, target_modules=["k_proj", "up_proj", "v_proj"]),
        make_adapter(base, root / "e2", 13, r=2, use_rslora=True, target_modules=["o_proj", "gate_proj", "q_proj"]),
    ]


@pytest.fixture(scope="module")
def slotted(experts, tmp_path_factory) -> Path:
    """An artifact with 4 slots of rank 8: an X-LoRA model's three experts and one plain adapter."""
    from compiler.compile import compile_model

    art = tmp_path_factory.mktemp("xlora") / "art"
    compile_model(str(experts[0]), art, quant="q0f32", lora_slots=4, lora_rank=8, progress=lambda _: None)
    return art


def xlora_model(base: Path, experts: list[Path], seed: int, **settings) -> torch.nn.Module:
    """PEFT's X-LoRA model over `experts` (named "0", "1", ...: PEFT applies only experts named by their index)
    with a random classifier."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config.use_cache = False  # XLoraModel requires it
    hidden = model.config.hidden_size
    adapters = {str(i): str(path) for i, path in enumerate(experts)}
    config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=hidden, adapters=adapters, **settings)
    xlora = peft.get_peft_model(model, config).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in xlora.named_parameters():
            if "internal_xlora_classifier" in name:
                param.copy_(torch.randn_like(param) * (0.3 if name.endswith("weight") else 0.5))
    return xlora


def save_xlora(xlora: torch.nn.Module, folder: Path) -> Path:
    """Save as PEFT does, then rewrite its tensor files whole (same names): PEFT 0.21 leaves out every tensor whose
    name has `.j.` for another expert j, so each expert loses a layer and a deeper classifier its first linear
    (0.22 saves them whole, the experts with the base weights and the classifier along)."""
    xlora.save_pretrained(folder)
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in xlora.named_modules():
        if isinstance(module, peft.tuners.lora.Linear):
            for expert in module.lora_A:
                for part in ("lora_A", "lora_B"):
                    weight = getattr(module, part)[expert].weight
                    experts.setdefault(expert, {})[f"{name}.{part}.weight"] = weight.detach().clone()
    for expert, tensors in experts.items():
        save_file(tensors, str(folder / expert / "adapter_model.safetensors"))
    classifier = {
        f"{CLASSIFIER}{name}": param.detach().clone()
        for name, param in xlora.base_model.internal_xlora_classifier.named_parameters()
    }
    save_file(classifier, str(folder / "adapter_model.safetensors"))
    return folder


def without(folder: Path, copy: Path, drop: Callable[[Path, str], bool]) -> Path:
    """`folder` (copied to `copy` unless the same) with its tensor files rewritten without the tensors for which
    drop(file, name) holds."""
    if copy != folder:
        shutil.copytree(folder, copy)
    for file in copy.rglob("adapter_model.safetensors"):
        tensors = load_file(file)
        save_file({name: t for name, t in tensors.items() if not drop(file, name)}, str(file))
    return copy


@pytest.mark.parametrize("name", SETTINGS)
def test_xlora_equals_peft(name, experts, slotted, tmp_path):
    base, paths = experts
    reference = xlora_model(base, paths, seed=len(name), **SETTINGS[name])
    engine = Engine(slotted, adapters={name: save_xlora(reference, tmp_path / name)})
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        x = torch.tensor([ids])
        with torch.no_grad():
            expected = reference(input_ids=x).logits[0].numpy()
            theirs = reference.generate(
                input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, eos_token_id=None
            )
        ours = engine.prompt_logits(ids, adapter=name)
        assert np.abs(ours - expected).max() <= TOLERANCE, name
        assert np.abs(engine.prompt_logits(ids) - expected).max() > 100 * TOLERANCE  # the experts matter
        tokens = engine.generate_ids([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), name)
        assert tokens[0].token_ids == theirs[0, len(ids) :].tolist(), name


def test_xlora_reads_peft_saves_as_they_are(experts, slotted, tmp_path):
    """PEFT 0.22 and later save an X-LoRA model whole (each expert's file also holds the base weights and the
    classifier): such a folder, as saved, equals PEFT; PEFT 0.21's lossy saves are refused in one line."""
    base, paths = experts
    reference = xlora_model(base, paths, seed=5, **SETTINGS["deep-layerwise"])
    reference.save_pretrained(tmp_path / "saved")
    if Version(peft.__version__) < Version("0.22"):
        with pytest.raises(MlccError, match="has 1 of its 2 linear layers"):
            Engine(slotted, adapters={"x": tmp_path / "saved"})
        return
    engine = Engine(slotted, adapters={"x": tmp_path / "saved"})
    ids = engine.tokenizer.encode(PROMPTS[0])
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(engine.prompt_logits(ids, adapter="x") - expected).max() <= TOLERANCE


def test_a_batch_mixing_xlora_an_adapter_and_the_base_equals_each_alone(experts, slotted, tmp_path):
    base, paths = experts
    folder = save_xlora(xlora_model(base, paths, seed=7, **SETTINGS["deep-layerwise"]), tmp_path / "mix")
    engine = Engine(slotted, adapters={"mix": folder, "plain": paths[1]})
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=True)
    jobs = [(prompt, name) for prompt in PROMPTS for name in ("mix", None, "plain", "mix")]
    alone = assert_batch_equals_alone(engine, jobs, params)
    assert len({tuple(r.token_ids) for r in alone[:3]}) == 3  # the three kinds do differ
    # X-LoRA sequences are not kept for their prefixes: a long prompt again is computed afresh, to the same tokens
    ids = engine.tokenizer.encode("word " * 200)[: engine.canonical_chunk + 8]
    first = engine.generate_ids([ids], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), "mix")[0]
    again = engine.generate_ids([ids], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), "mix")[0]
    assert again.cached_tokens == 0 and again.token_ids == first.token_ids
    assert engine.kv_tokens_used == 0  # both sequences of every X-LoRA request were freed


def test_xlora_folder_errors_are_one_line(experts, slotted, tmp_path):
    from click.testing import CliRunner

    from mlcc_cli import main

    base, paths = experts
    good = save_xlora(xlora_model(base, paths, seed=3, **SETTINGS["deep-layerwise"]), tmp_path / "good")
    # the folders PEFT 0.21 saves (it loses tensors named with another expert's index), made whichever PEFT runs
    lost_first = without(good, tmp_path / "lost-first", lambda file, name: name.startswith(CLASSIFIER + "layers.0."))
    with pytest.raises(MlccError, match="has 1 of its 2 linear layers"):
        Engine(slotted, adapters={"x": lost_first})
    shallow = tmp_path / "peft-saved-shallow"
    model = xlora_model(base, paths, seed=4, **SETTINGS["dense"])
    model.save_pretrained(shallow)  # experts with the base weights along
    without(shallow, shallow, lambda file, name: file.parent != shallow and ".layers.1." in name)
    save_file({}, str(shallow / "adapter_model.safetensors"))
    with pytest.raises(MlccError, match="has 0 of its 1 linear layers"):
        Engine(slotted, adapters={"x": shallow})
    classifier = model.base_model.internal_xlora_classifier.state_dict()
    save_file({CLASSIFIER + k: v for k, v in classifier.items()}, str(shallow / "adapter_model.safetensors"))
    with pytest.raises(MlccError, match="expert has no tensors of layer 1"):
        Engine(slotted, adapters={"x": shallow})

    no_expert = shutil.copytree(good, tmp_path / "no-expert")
    shutil.rmtree(no_expert / "1")
    with pytest.raises(MlccError, match="expert folder '1' is missing"):
        Engine(slotted, adapters={"x": no_expert})

    flat = shutil.copytree(good, tmp_path / "flat")  # a layerwise classifier read as one for all modules
    config = json.loads((flat / "adapter_config.json").read_text())
    (flat / "adapter_config.json").write_text(json.dumps({**config, "layerwise_scalings": False}))
    with pytest.raises(MlccError, match="gives 42 scalings, not 3"):
        Engine(slotted, adapters={"x": flat})
    (flat / "adapter_config.json").write_text(json.dumps({**config, "softmax_temperature": 0}))
    with pytest.raises(MlccError, match="invalid X-LoRA setting: softmax_temperature must be positive"):
        Engine(slotted, adapters={"x": flat})
    result = CliRunner().invoke(main, ["serve", str(slotted), "--adapter", f"x={no_expert}"])
    assert result.exit_code == 1 and "expert folder '1' is missing" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1

    engine = Engine(slotted, adapters={"plain": paths[0], "other": paths[1]})
    with pytest.raises(MlccError, match="3 experts need as many adapter slots; 2 are free"):
        engine.load_adapter("x", good)
    with pytest.raises(MlccError, match="unknown adapter 'x' \\(adapters: plain, other\\)"):
        engine.make_requests([1, 2], SamplingParams(), adapter="x")


def test_xlora_requests_preempted_for_kv_pages_recompute_both_sequences(experts, slotted, tmp_path):
    base, paths = experts
    folder = save_xlora(xlora_model(base, paths, seed=9, **SETTINGS["top-k"]), tmp_path / "mix")
    roomy = Engine(slotted, adapters={"mix": folder, "plain": paths[2]})
    tight = Engine(slotted, adapters={"mix": folder, "plain": paths[2]}, kv_cache_tokens=192)  # 12 pages
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)  # 4 pages per sequence at the end
    jobs = [(f"{PROMPTS[i % 2]} {i}", name) for i, name in enumerate(["mix", "mix", "plain", "mix"])]
    requests = [r for p, name in jobs for r in tight.make_requests(tight.tokenizer.encode(p), params, adapter=name)]
    tight.enqueue(requests)
    while tight.has_work:
        tight.step()
        assert tight.kv_tokens_used <= tight.kv.total_pages * tight.page_size
    assert any(r.preemptions for r, (_, name) in zip(requests, jobs) if name == "mix")
    for r, (prompt, name) in zip(requests, jobs):
        assert r.output_ids == roomy.generate_ids([roomy.tokenizer.encode(prompt)], params, name)[0].token_ids


def test_the_server_serves_an_xlora_model_by_name(experts, slotted, tmp_path):
    from fastapi.testclient import TestClient

    from runtime import ServingEngine
    from runtime.server import create_app

    base, paths = experts
    folder = save_xlora(xlora_model(base, paths, seed=5, **SETTINGS["dense"]), tmp_path / "mix")
    serving = ServingEngine(slotted, adapters={"mix": folder})
    try:
        client = TestClient(create_app(serving, "base"))
        models = client.get("/v1/models").json()["data"]
        assert [(m["id"], m.get("parent")) for m in models] == [("base", None), ("mix", "base")]
        body = {"model": "mix", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
        reply = client.post("/v1/completions", json=body).json()
        ids = serving.engine.tokenizer.encode(PROMPTS[0])
        greedy = SamplingParams(max_tokens=8, temperature=0)
        with_xlora = Engine(slotted, adapters={"mix": folder}).generate_ids([ids], greedy, "mix")
        assert reply["model"] == "mix" and reply["choices"][0]["text"] == with_xlora[0].text
    finally:
        serving.close()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "phi", "gemma", "gemma2", "gemma3", "mixtral"])
def test_slot_module_order_is_the_checkpoints(arch, tmp_path):
    """X-LoRA's layerwise scalings number the adapted modules in the HF model's module order; the manifest's
    module_order is the model_defs' declaration order, which must be the same."""
    from compiler.compile import _plan_hf
    from compiler.lora_slots import block_linears, source_modules
    from model_defs import get_arch

    folder = make_model(arch, tmp_path / arch)
    arch_name, config, *_, shapes = _plan_hf(str(folder), None, "q0f32", [])
    names = source_modules(shapes())
    ours = [names[path] for path in block_linears(get_arch(arch_name).Model(config))]
    hf = AutoModelForCausalLM.from_pretrained(folder)
    theirs = [name for name, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    assert ours == [name for name in theirs if name in ours] and ours


def test_xlora_on_phi3_fused_modules_and_longrope(hf_folder, tmp_path):
    """Phi-3: fused qkv_proj and gate_up_proj, o_proj before qkv_proj in the layerwise order, and LongRoPE (the
    scaling pass takes prompt lengths too: one prompt on each side of the 64-token switch). The reference is PEFT
    in float64. Past the switch this configuration is sensitive to float32 rounding: PEFT's own float32 logits
    of the long prompt are 1.5e-4 off, mlcc's 3.3e-4 (6.5e-5 before every kernel was compiled `noalias`, which
    lets LLVM fuse other multiply-adds), so the bound is the larger of TOLERANCE and 4x PEFT's float32 error;
    logits without the adapters are 100x TOLERANCE off."""
    from compiler.compile import compile_model

    base = hf_folder("phi3-f32")
    paths = [
        make_adapter(base, tmp_path / "e0", 21, r=4, target_modules=["qkv_proj", "o_proj"]),
        make_adapter(base, tmp_path / "e1", 22, r=8, lora_alpha=4, target_modules=["gate_up_proj", "down_proj"]),
        make_adapter(base, tmp_path / "e2", 23, r=2, target_modules=["qkv_proj", "down_proj"]),
    ]
    art = tmp_path / "art"
    compile_model(str(base), art, quant="q0f32", lora_slots=3, lora_rank=8, progress=lambda _: None)
    reference = xlora_model(base, paths, seed=1, **SETTINGS["deep-layerwise"])
    engine = Engine(art, adapters={"mix": save_xlora(reference, tmp_path / "mix")})
    prompts = [engine.tokenizer.encode(prompt) for prompt in (PROMPTS[0], "word " * 40)]
    with torch.no_grad():
        in_float32 = [reference(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in prompts]
        reference.double()
        expected = [reference(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in prompts]
    for ids, theirs, exact in zip(prompts, in_float32, expected):
        bound = max(TOLERANCE, 4 * np.abs(theirs - exact).max())
        assert np.abs(engine.prompt_logits(ids, adapter="mix") - exact).max() <= bound
        assert np.abs(engine.prompt_logits(ids) - exact).max() > 100 * TOLERANCE
    assert len(engine.tokenizer.encode("word " * 40)) > 64
