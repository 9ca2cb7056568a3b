"""Tiny HF checkpoints written as GGUF files the way llama.cpp's convert_hf_to_gguf.py writes them: gguf-py's
tensor name map, llama.cpp's metadata keys per architecture (Gemma 3's linear RoPE scaling included), Gemma's norms
with the 1 folded in, Phi-3's LongRoPE factors as `rope_factors_*` tensors, the tokenizer as a `gpt2` BPE
vocabulary. Float32 tensors throughout.

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

GGUF_ARCH = {"phi3": "phi3", "phi": "phi2", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
NORMAL, CONTROL = 1, 3


def write_gguf(folder: Path, out: Path) -> Path:
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
        writer.add_tensor(name, array)
    _add_tokenizer(writer, folder)
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
