"""Tiny random-weight Hugging Face models with a real trained tokenizer, saved as real HF folders."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "Once upon a time there was a little robot who loved to compile programs.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { }",
    "def main():\n    print('hello, world')\n    return 42\n",
    "Hello! How are you today? I am fine, thank you. What is the capital of France? Paris.",
    "Ahead-of-time compilers turn models into libraries; runtimes load them on small devices.",
] * 20

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL = ["<s>", "</s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE)


ARCH_CONFIGS = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=6),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=1),
    # LongRoPE whose switch (64 tokens) lies within the tests' prompts; factors differ per frequency. The engine
    # prefills in chunks of 128 here (a quarter of the 512-token kernel chunk), past the switch, so that every
    # prefill call of a long prompt sees it long, as transformers' single call does.
    "phi3": dict(
        model_type="phi3",
        pad_token_id=1,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        original_max_position_embeddings=64,
        rope_scaling=dict(
            type="longrope",
            short_factor=[1.0 + 0.25 * i for i in range(8)],
            long_factor=[3.0 + 2 * i for i in range(8)],
        ),
        sliding_window=None,
    ),
    # Phi-2: parallel attention and MLP, LayerNorm with bias, half of each head rotated (Phi-2 itself: 0.4).
    "phi": dict(model_type="phi", partial_rotary_factor=0.5, max_position_embeddings=256),
    # Gemma's 2B shape in small: multi-query attention, head_dim apart from hidden / heads, tied head.
    "gemma": dict(
        model_type="gemma", num_key_value_heads=1, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True
    ),
    # Gemma 2: a sliding layer then a global one, caps low enough to bend most scores and logits.
    "gemma2": dict(
        model_type="gemma2",
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,  # as every Gemma 2, and as llama.cpp's converter assumes
        sliding_window=8,
        query_pre_attn_scalar=32,  # what llama.cpp assumes but for the 27B shape (Gemma 3's test has another)
        attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0,
    ),
    # A sliding layer then a global one with linear RoPE scaling (as Gemma 3 4B+), a query scalar apart from
    # head_dim, and a window far shorter than the tests' prompts.
    "gemma3": dict(
        model_type="gemma3_text",
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    ),
    # Mixtral: experts in every layer, top-2 routing; tests/test_mixtral.py sets the expert counts and sizes.
    "mixtral": dict(
        model_type="mixtral",
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        sliding_window=None,
    ),
}


def make_model(arch: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random `arch` model with its tokenizer to `folder`."""
    tokenizer = build_tokenizer(384)
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    fields.update(ARCH_CONFIGS[arch])
    fields.update(overrides)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # random init is near-uniform; widen it so logits and greedy picks are distinct
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if "embed" in name else p.shape[-1] ** -0.5 * 1.5))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_adapter(base: Path, folder: Path, seed: int, **config) -> Path:
    """A PEFT LoRA adapter with random A and B (PEFT starts B at zero, which would change nothing)."""
    import peft

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    lora.save_pretrained(folder)
    return folder


def merged_reference(base: Path, adapters: list[Path]) -> torch.nn.Module:
    """transformers + PEFT with `adapters` merged in, in order."""
    import peft

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for adapter in adapters:
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def assert_batch_equals_alone(engine, jobs: list[tuple[str, str | None]], params) -> list:
    """Run each (prompt, adapter) job alone, then all of them in one batch: the same tokens and logprobs.
    Returns the solo results."""
    alone = [engine.generate_ids([engine.tokenizer.encode(p)], params, name)[0] for p, name in jobs]
    requests = [r for p, name in jobs for r in engine.make_requests(engine.tokenizer.encode(p), params, adapter=name)]
    engine.enqueue(requests)
    while engine.has_work:
        engine.step()
    for solo, together in zip(alone, (r.result() for r in requests)):
        assert together.token_ids == solo.token_ids
        assert [t.logprob for t in together.logprobs] == [t.logprob for t in solo.logprobs]
    return alone
