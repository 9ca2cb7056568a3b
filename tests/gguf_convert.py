"""Tiny HF checkpoints written as GGUF files the way llama.cpp's convert_hf_to_gguf.py writes them: gguf-py's
tensor name map, llama.cpp's metadata keys per architecture (Gemma 3's linear RoPE scaling included), Llama's Q/K
rows in llama.cpp's interleaved RoPE order, Gemma's norms with the 1 folded in, Phi-3's LongRoPE factors as
`rope_factors_*` tensors, the tokenizer as a `gpt2` BPE vocabulary. Float32 tensors, or matrices in a block type
gguf-py can encode. PEFT adapters as llama.cpp's convert_lora_to_gguf.py writes them (write_gguf_lora).

Where llama.cpp's converter would do otherwise for these tiny models (Gemma's SentencePiece vocabulary, Phi-2's
feed-forward length fixed at 4 * hidden), the file follows the checkpoint instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

GGUF_ARCH = {
    "llama": "llama",
    "phi3": "phi3",
    "phi": "phi2",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}
NORMAL, CONTROL = 1, 3


def permute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Q/K rows (or a LoRA B's) in the interleaved RoPE order llama.cpp's converter writes (LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_heads(cfg: dict, hf_name: str) -> int | None:
    """The heads whose rows llama.cpp's converter permutes in this tensor (Llama's q_proj and k_proj), else None."""
    if cfg["model_type"] != "llama":
        return None
    if ".q_proj." in hf_name:
        return cfg["num_attention_heads"]
    if ".k_proj." in hf_name:
        return cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return None


def write_gguf(folder: Path, out: Path, matrix_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32) -> Path:
    """`matrix_type`: the type of every 2-D tensor whose rows fill its blocks (norms and vectors stay F32)."""
    cfg = json.loads((folder / "config.json").read_text())
    model_type = cfg["model_type"]
    arch = GGUF_ARCH[model_type]
    writer = gguf.GGUFWriter(str(out), arch)
    heads, hidden, layers = cfg["num_attention_heads"], cfg["hidden_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // heads
    rope = cfg.get("rope_parameters") or {}
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if model_type == "phi":
        writer.add_layer_norm_eps(cfg["layer_norm_eps"])
    else:
        writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if model_type in ("phi", "phi3"):
        writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * hidden) // heads)
    if model_type.startswith("gemma"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if model_type in ("gemma2", "gemma3_text"):
        writer.add_sliding_window(cfg["sliding_window"])
    if model_type == "gemma2":
        writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if model_type == "gemma3_text" and rope.get("full_attention", {}).get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)  # of the global layers
        writer.add_rope_scaling_factor(rope["full_attention"]["factor"])
    theta = rope.get("full_attention", rope).get("rope_theta")
    if theta is not None:
        writer.add_rope_freq_base(theta)
    tensors = load_file(str(folder / "model.safetensors"))
    if model_type == "phi3" and rope.get("rope_type") == "longrope":
        original = cfg["original_max_position_embeddings"]
        scale = cfg["max_position_embeddings"] / original
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
        writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    for hf_name, array in tensors.items():
        if model_type == "gemma" and hf_name == "lm_head.weight":
            continue  # llama.cpp's Gemma always ties the head
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        array = array.astype(np.float32)
        if model_type.startswith("gemma") and hf_name.endswith("norm.weight"):
            array = array + np.float32(1)
        if (heads := rope_heads(cfg, hf_name)) is not None:
            array = permute_rope_rows(array, heads)
        block = gguf.GGML_QUANT_SIZES[matrix_type][0]
        if matrix_type != gguf.GGMLQuantizationType.F32 and array.ndim == 2 and array.shape[1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, matrix_type), raw_dtype=matrix_type)
        else:
            writer.add_tensor(name, array)
    _add_tokenizer(writer, folder)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_gguf_lora(adapter: Path, out: Path, base: Path) -> Path:
    """A PEFT adapter of the HF model `base` as llama.cpp's convert_lora_to_gguf.py writes it: `<GGUF tensor>.lora_a`
    / `.lora_b` in float32, B's rows reordered as the base's (Llama's Q/K), the embedding's lora_a as [vocab, r],
    and `adapter.lora.alpha`. The copies of base modules PEFT saves beside the factors are left out, as it does."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    cfg = json.loads((base / "config.json").read_text())
    arch = GGUF_ARCH[cfg["model_type"]]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    for key, value in load_file(str(adapter / "adapter_model.safetensors")).items():
        if ".lora_" not in key:
            continue
        module, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        value = value.astype(np.float32)
        if part.startswith("embedding_A"):  # PEFT's [r, vocab]; llama.cpp reads embedding rows out of lora_a
            value = value.T
        elif part.startswith("B") and (heads := rope_heads(cfg, module + ".weight")) is not None:
            value = permute_rope_rows(value, heads)
        writer.add_tensor(f"{name}.lora_{'a' if 'A' in part else 'b'}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_tokenizer(writer: gguf.GGUFWriter, folder: Path) -> None:
    """The byte-level BPE tokenizer as llama.cpp's `gpt2` vocabulary."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    vocab = {**{i: t for t, i in tok["model"]["vocab"].items()}, **added}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list([vocab[i] for i in range(len(vocab))])
    writer.add_token_types([CONTROL if i in added else NORMAL for i in range(len(vocab))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)
    template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if template:
        writer.add_chat_template(template)
