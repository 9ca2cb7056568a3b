"""Compiled models against transformers: last-token logits and greedy decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from model_defs.llama import map_hf_name
from quant_schemes import get_scheme
from runtime import SamplingParams

PROMPTS = [
    "Hello! How are you today?",
    "def main():\n    print('hello, world')\n    return 42\nThe quick brown fox jumps over the lazy dog.",
    "Paris",
]


def load_reference(folder, quant: str | None = None):
    """transformers on `folder`; with `quant`, on the weights the compiled model sees: each matrix quantized in
    the format the scheme gives it, then dequantized (a tied head gets its own copy, as in the artifact)."""
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    if quant:
        scheme = get_scheme(quant)
        with torch.no_grad():
            if model.config.tie_word_embeddings:
                model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
            for hf_name, p in model.named_parameters():
                if p.ndim == 2:
                    fmt = scheme.format_for(map_hf_name(hf_name).removesuffix(".weight"))
                    w = p.numpy()
                    p.copy_(torch.from_numpy(fmt.dequantize(fmt.quantize(w), w.shape[1])))
    return model, PreTrainedTokenizerFast.from_pretrained(folder)


def reference_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():  # explicit mask: BOS shares id 0 with what generate() would take for padding
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1
        )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize(
    "variant,quant,tol",
    [
        ("llama-f32", None, 1e-3),
        ("mistral-f32", None, 1e-3),
        ("qwen2-f32", None, 1e-3),
        ("llama-q4", "q4", 1e-3),
        ("odd-tied-q4", "q4", 1e-3),
    ],
)
def test_logits_and_greedy_match_transformers(variant, quant, tol, hf_folder, engine):
    model, tokenizer = load_reference(hf_folder(variant), quant)
    eng = engine(variant)
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    assert [eng.tokenizer.encode(p) for p in PROMPTS] == ids
    ours = eng.prefill_logits(ids)
    for row, prompt_ids in zip(ours, ids):
        ref = reference_logits(model, prompt_ids)
        assert np.abs(row - ref).max() <= tol
    results = eng.generate_ids(ids, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    for result, prompt_ids in zip(results, ids):
        assert result.token_ids == reference_greedy(model, prompt_ids, 16)


def test_mistral_prompt_longer_than_sliding_window(hf_folder, engine):
    """Tokens beyond the window must not be attended: long prompts still match transformers."""
    model, tokenizer = load_reference(hf_folder("mistral-f32"))
    assert model.config.sliding_window is not None
    ids = tokenizer(PROMPTS[1] * 2).input_ids
    assert len(ids) > 4 * model.config.sliding_window
    row = engine("mistral-f32").prefill_logits([ids])[0]
    assert np.abs(row - reference_logits(model, ids)).max() <= 1e-3


def test_float16_close_to_transformers(hf_folder, engine):
    model, tokenizer = load_reference(hf_folder("qwen2-f16"))
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    ours = engine("qwen2-f16").prefill_logits(ids)
    for row, prompt_ids in zip(ours, ids):
        ref = reference_logits(model, prompt_ids)
        assert np.abs(row - ref).max() <= 0.05 * np.abs(ref).max()
        assert row.argmax() == ref.argmax()


def test_batch_equals_each_alone(engine):
    eng = engine("llama-q4")
    ids = [eng.tokenizer.encode(p) for p in PROMPTS]
    assert len({len(i) for i in ids}) == 3
    together = eng.prefill_logits(ids)
    for row, prompt_ids in zip(together, ids):
        np.testing.assert_allclose(row, eng.prefill_logits([prompt_ids])[0], atol=1e-5)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    batched = eng.generate_ids(ids, params)
    alone = [eng.generate_ids([i], params)[0] for i in ids]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
