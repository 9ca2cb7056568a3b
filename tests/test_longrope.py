"""LongRoPE (Phi-3-128k) with prompts longer than the canonical prefill chunk and the factor switch.

transformers rotates every token of a forward call with the factors its length selects (long beyond
`original_max_position_embeddings`). The engine prefills in canonical chunks, so a long prompt's early chunks end
before the switch: prefill passes each token its whole prompt's length, and a cached prefix is reused only by a
prompt on the same side of the switch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import make_model
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedTokenizerFast

from runtime import Engine, SamplingParams

SWITCH = 160  # original_max_position_embeddings: beyond the first canonical chunk (128 tokens)
SENTENCE = "def main():\n    print('hello, world')\n    return 42\nThe quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """(transformers model, tokenizer, engine) of a tiny Phi-3 whose switch lies past one canonical chunk."""
    from compiler.compile import compile_model

    work = tmp_path_factory.mktemp("longrope")
    folder = make_model("phi3", work / "hf", original_max_position_embeddings=SWITCH)
    compile_model(str(folder), work / "art", quant="q0f32", progress=lambda _: None)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    engine = Engine(work / "art")
    assert engine.canonical_chunk < SWITCH and engine.rope_switch_length == SWITCH
    return model, PreTrainedTokenizerFast.from_pretrained(folder), engine


def cached_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens of one prefill forward over the prompt, then one forward per token with the cache."""
    out, cache = [], DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), cache=cache, use_cache=True).logits
        for _ in range(n):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([out[-1:]]), cache=cache, use_cache=True).logits
    return out


def test_long_prompt_every_position_matches_transformers(phi3):
    model, tokenizer, engine = phi3
    long = tokenizer(SENTENCE * 4).input_ids
    assert len(long) > SWITCH
    for ids in (long, long[: SWITCH - 10]):  # both factor sets, each over more than one canonical chunk
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(engine.prompt_logits(ids) - ref).max() <= 1e-4


def test_prefix_reused_only_on_the_same_side_of_the_switch(phi3):
    model, tokenizer, engine = phi3
    long = tokenizer(SENTENCE * 4).input_ids
    short, longer = long[: SWITCH - 10], long + tokenizer(" Paris").input_ids[1:]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    runs = [engine.generate_ids([ids], params)[0] for ids in (short, long, longer)]
    assert [r.cached_tokens for r in runs] == [0, 0, engine.canonical_chunk]
    for ids, r in zip((short, long, longer), runs):
        assert r.token_ids == cached_greedy(model, ids, 8)
