"""Adapter slots: one q0f32 build with `--lora-slots`, PEFT adapters loaded at run time. Each adapter's logits equal
transformers + PEFT with that adapter merged, the base model stays itself, and a batch mixing adapters equals
each request alone."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import openai
import pytest
import torch
import uvicorn

pytest.importorskip("peft")

from gguf_convert import write_gguf, write_gguf_lora  # noqa: E402
from tiny_models import assert_batch_equals_alone, make_adapter, merged_reference  # noqa: E402

from artifacts.errors import MlccError  # noqa: E402
from runtime import Engine, SamplingParams, ServingEngine  # noqa: E402
from runtime.server import create_app  # noqa: E402

PROMPTS = ["Once upon a time there was", "def main():\n    print("]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def slotted(hf_folder, tmp_path_factory):
    """(base folder, {name: adapter folder}, artifact with 3 slots of rank 8)."""
    from compiler.compile import compile_model

    base = hf_folder("llama-f32")
    root = tmp_path_factory.mktemp("lora-slots")
    adapters = {
        "poet": make_adapter(
            base,
            root / "poet",
            1,
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
            rank_pattern={"down_proj": 2},
            alpha_pattern={"o_proj": 3},
        ),
        "coder": make_adapter(base, root / "coder", 2, r=8, lora_alpha=5, target_modules=["k_proj", "up_proj"]),
    }
    art = root / "art"
    compile_model(str(base), art, quant="q0f32", lora_slots=3, lora_rank=8, progress=lambda _: None)
    return base, adapters, art


@pytest.fixture(scope="module")
def engine(slotted):
    _, adapters, art = slotted
    return Engine(art, adapters=adapters)


def test_each_adapter_equals_transformers_with_it_merged(slotted, engine):
    base, adapters, _ = slotted
    for name in (None, *adapters):
        reference = merged_reference(base, [adapters[name]] if name else [])
        for prompt in PROMPTS:
            ids = engine.tokenizer.encode(prompt)
            with torch.no_grad():
                expected = reference(torch.tensor([ids])).logits[0].numpy()
            assert np.abs(engine.prompt_logits(ids, adapter=name) - expected).max() <= TOLERANCE, name
            ours = engine.generate_ids([ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), name)
            x = torch.tensor([ids])
            with torch.no_grad():  # EOS is a token like any other here, as with ignore_eos
                theirs = reference.generate(
                    x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False, eos_token_id=None
                )
            assert ours[0].token_ids == theirs[0, len(ids) :].tolist(), name


def test_a_batch_mixing_adapters_equals_each_alone(engine):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=True)
    jobs = [(prompt, name) for prompt in PROMPTS for name in (None, "poet", "coder")]
    alone = assert_batch_equals_alone(engine, jobs, params)
    assert len({tuple(r.token_ids) for r in alone[:3]}) == 3  # the adapters do change the output


def test_prefixes_are_not_shared_across_adapters(engine):
    ids = engine.tokenizer.encode("word " * 200)[: engine.canonical_chunk + 8]
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    first = engine.generate_ids([ids], params, "poet")[0]
    assert engine.generate_ids([ids], params, "coder")[0].cached_tokens == 0
    again = engine.generate_ids([ids], params, "poet")[0]
    assert again.cached_tokens == engine.canonical_chunk and again.token_ids == first.token_ids


def test_the_server_serves_each_adapter_as_a_model(slotted, engine):
    _, adapters, art = slotted
    serving = ServingEngine(art, adapters=adapters)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    http = uvicorn.Server(uvicorn.Config(create_app(serving, "base"), port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.02)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [(m.id, getattr(m, "parent", None)) for m in client.models.list().data] == [
            ("base", None),
            ("poet", "base"),
            ("coder", "base"),
        ]
        params, ids = SamplingParams(max_tokens=8, temperature=0), engine.tokenizer.encode(PROMPTS[0])
        for name in ("base", "poet", "coder"):
            reply = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=0)
            expected = engine.generate_ids([ids], params, None if name == "base" else name)
            assert reply.model == name and reply.choices[0].text == expected[0].text
        with pytest.raises(openai.NotFoundError, match="'poet', 'coder'"):
            client.completions.create(model="other", prompt="Hi", max_tokens=2)
    finally:
        http.should_exit = True
        thread.join()
        serving.close()


def test_adapter_errors_are_one_line(slotted, engine, hf_folder, artifact, tmp_path):
    from click.testing import CliRunner

    from compiler.compile import compile_model
    from mlcc_cli import main

    base, adapters, _ = slotted
    with pytest.raises(MlccError, match="unknown adapter 'nope'"):
        engine.make_requests([1, 2], SamplingParams(), adapter="nope")
    with pytest.raises(MlccError, match="loaded already"):
        engine.load_adapter("poet", adapters["poet"])
    engine.load_adapter("third", adapters["coder"])
    with pytest.raises(MlccError, match="slots are taken"):
        engine.load_adapter("fourth", adapters["coder"])
    wide = make_adapter(base, tmp_path / "wide", 3, r=16, target_modules=["q_proj"])
    embed = make_adapter(base, tmp_path / "embed", 4, r=2, target_modules=["embed_tokens"])
    fresh = Engine(slotted[2])
    with pytest.raises(MlccError, match="rank 16"):
        fresh.load_adapter("wide", wide)
    with pytest.raises(MlccError, match="no adapter slot"):
        fresh.load_adapter("embed", embed)
    with pytest.raises(MlccError, match="--lora-slots"):
        Engine(artifact("llama-f32")).load_adapter("poet", adapters["poet"])
    with pytest.raises(MlccError, match="--lora-slots must be"):
        compile_model(str(base), tmp_path / "x", lora_slots=2, lora_rank=0)
    result = CliRunner().invoke(main, ["serve", str(slotted[2]), "--adapter", "poet"])
    assert result.exit_code == 1 and "NAME=PATH" in result.output


def test_a_gguf_base_takes_llama_cpp_adapters(hf_folder, tmp_path):
    """Phi-3 as GGUF with a llama.cpp LoRA file of a PEFT adapter equals transformers + PEFT merged."""
    from compiler.compile import compile_model

    base = hf_folder("phi3-f32")
    modules = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    adapter = make_adapter(base, tmp_path / "peft", 5, r=4, lora_alpha=6, target_modules=modules)
    lora_file = write_gguf_lora(adapter, tmp_path / "lora.gguf", base)
    art = tmp_path / "art"
    compile_model(str(write_gguf(base, tmp_path / "base.gguf")), art, quant="gguf-f32", lora_slots=1, lora_rank=4)
    engine = Engine(art, adapters={"tuned": lora_file})
    reference = merged_reference(base, [adapter])
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(engine.prompt_logits(ids, adapter="tuned") - expected).max() <= TOLERANCE
        assert np.abs(engine.prompt_logits(ids) - expected).max() > 100 * TOLERANCE  # the adapter matters
    with pytest.raises(MlccError, match="takes llama.cpp GGUF adapters"):
        Engine(art).load_adapter("peft", adapter)
