"""LoRA adapters merged at compile time equal transformers + PEFT with the adapters merged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")

from tiny_models import make_adapter, merged_reference  # noqa: E402

from artifacts.errors import MlccError  # noqa: E402
from artifacts.lora_formats import load_adapter  # noqa: E402
from compiler.lora import LoraMerge  # noqa: E402
from compiler.source import resolve_model  # noqa: E402
from runtime import Engine, SamplingParams  # noqa: E402

PROMPTS = ["Once upon a time there was", "def main():\n    print("]


@pytest.fixture(scope="module")
def adapters(hf_folder, tmp_path_factory) -> tuple[Path, list[Path]]:
    base = hf_folder("llama-f32")
    root = tmp_path_factory.mktemp("lora")
    first = make_adapter(
        base,
        root / "a",
        1,
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "embed_tokens", "lm_head"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"o_proj": 3},
    )
    second = make_adapter(
        base, root / "b", 2, r=3, lora_alpha=5, target_modules=["k_proj", "up_proj"], modules_to_save=["lm_head"]
    )
    return base, [first, second]


def test_merged_tensors_equal_peft_merge(adapters):
    base, folders = adapters
    reference = merged_reference(base, folders).state_dict()
    source = resolve_model(str(base))
    merge = LoraMerge([load_adapter(f) for f in folders], source.tensor_shapes())
    changed = 0
    for name, array in source.tensors():
        ours = merge(name, array)
        changed += not np.array_equal(ours, array)
        np.testing.assert_allclose(ours, reference[name].numpy(), atol=1e-6, rtol=1e-6, err_msg=name)
    assert changed == 2 * 5 + 2 + 2 * 2  # 5 projections x 2 layers, embeddings, lm_head; 2 more x 2 layers


def test_compiled_with_adapters_equals_transformers_and_peft(adapters, tmp_path):
    from compiler.compile import compile_model

    base, folders = adapters
    out = tmp_path / "merged"
    compile_model(str(base), out, quant="q0f32", loras=[str(f) for f in folders], progress=lambda _: None)
    engine = Engine(out)
    reference = merged_reference(base, folders)
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(engine.prompt_logits(ids) - expected).max() <= 1e-4
        ours = engine.generate_ids([ids], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert ours.token_ids == theirs[0, len(ids) :].tolist()


def test_lora_scale_multiplies_every_adapter(adapters):
    base, folders = adapters
    source = resolve_model(str(base))
    shapes = source.tensor_shapes()
    whole, half, none = (LoraMerge([load_adapter(folders[1], s)], shapes) for s in (1.0, 0.5, 0.0))
    for name, array in source.tensors():
        np.testing.assert_allclose(half(name, array) - array, (whole(name, array) - array) / 2, atol=1e-6)
        assert np.array_equal(none(name, array), array)


def test_adapters_that_cannot_be_merged_are_one_line_errors(adapters, hf_folder, tmp_path):
    from compiler.compile import compile_model

    base, folders = adapters
    with pytest.raises(MlccError, match="not a PEFT LoRA adapter"):
        load_adapter(tmp_path)
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((folders[0] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(MlccError, match="DoRA"):
        load_adapter(dora)
    other = resolve_model(str(hf_folder("odd-tied-q4")))  # another shape: the adapter does not fit
    with pytest.raises(MlccError, match="base model"):
        LoraMerge([load_adapter(folders[1])], other.tensor_shapes())
    with pytest.raises(MlccError, match="a GGUF model takes llama.cpp LoRA adapters"):
        compile_model("model.gguf", tmp_path / "x", loras=[str(folders[0])])
