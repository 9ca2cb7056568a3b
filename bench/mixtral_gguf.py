"""A random-weight Mixtral-shaped GGUF file, for timing the mixture-of-experts kernels on this machine.

    python bench/mixtral_gguf.py OUT.gguf [--hidden 1024] [--layers 8] [--experts 8] [--top-k 2] [--type Q4_0]
    mlcc compile --model OUT.gguf -o ART && python bench/cpu.py ART OUT.gguf

llama.cpp's layout: architecture `llama` with `expert_count`, experts stacked as 3-D `ffn_*_exps`, router
`ffn_gate_inp` in float32, every other matrix in `--type`. The vocabulary is a byte-level BPE trained on the
benchmark's text, padded with unused tokens to `--vocab`. Prints the bytes of the parameters a decoded token
reads (the active parameters: attention, router, top_k of the experts, output head, one embedding row).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf import quants as gguf_quants
from tokenizers import Tokenizer, models, pre_tokenizers, trainers


def stored_bytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * block_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--type", default="Q4_0", choices=["Q4_0", "Q8_0", "F32"])
    args = parser.parse_args()
    qtype = GGMLQuantizationType[args.type]
    rng = np.random.default_rng(0)
    h, i, e = args.hidden, args.intermediate, args.experts
    head_dim = h // args.heads

    writer = GGUFWriter(str(args.out), "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(h)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(i)
    writer.add_head_count(args.heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(1e6)
    writer.add_expert_count(e)
    writer.add_expert_used_count(args.top_k)
    _add_tokenizer(writer, args.vocab)

    active = 0

    def add(name: str, shape: tuple[int, ...], kind: GGMLQuantizationType, read_share: float = 1.0) -> None:
        nonlocal active
        w = (rng.standard_normal(shape, np.float32) * shape[-1] ** -0.5).astype(np.float32)
        if name.endswith("norm.weight"):
            w = np.ones(shape, np.float32)
        if kind == GGMLQuantizationType.F32:
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, gguf_quants.quantize(w, kind), raw_dtype=kind)
        active += int(stored_bytes(shape, kind) * read_share)

    add("token_embd.weight", (args.vocab, h), qtype, 1 / args.vocab)  # one row per token
    add("output_norm.weight", (h,), GGMLQuantizationType.F32)
    add("output.weight", (args.vocab, h), qtype)
    for layer in range(args.layers):
        blk = f"blk.{layer}"
        add(f"{blk}.attn_norm.weight", (h,), GGMLQuantizationType.F32)
        add(f"{blk}.ffn_norm.weight", (h,), GGMLQuantizationType.F32)
        add(f"{blk}.attn_q.weight", (args.heads * head_dim, h), qtype)
        add(f"{blk}.attn_k.weight", (args.kv_heads * head_dim, h), qtype)
        add(f"{blk}.attn_v.weight", (args.kv_heads * head_dim, h), qtype)
        add(f"{blk}.attn_output.weight", (h, args.heads * head_dim), qtype)
        add(f"{blk}.ffn_gate_inp.weight", (e, h), GGMLQuantizationType.F32)
        add(f"{blk}.ffn_gate_exps.weight", (e, i, h), qtype, args.top_k / e)
        add(f"{blk}.ffn_up_exps.weight", (e, i, h), qtype, args.top_k / e)
        add(f"{blk}.ffn_down_exps.weight", (e, h, i), qtype, args.top_k / e)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    size = args.out.stat().st_size
    print(f"wrote {args.out}: {size / 2**20:.1f} MiB; a decoded token reads {active / 2**20:.1f} MiB of parameters")


def _add_tokenizer(writer: GGUFWriter, vocab_size: int) -> None:
    """A `gpt2` BPE vocabulary trained on the benchmark's text, padded to `vocab_size` with unused tokens."""
    from runtime.benchmark import TEXT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT] * 10, trainer)
    spec = json.loads(tok.to_str())["model"]
    vocab = sorted(spec["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"<unused{n}>" for n in range(vocab_size - len(vocab))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")  # llama.cpp does not know "gpt2"
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in ("<s>", "</s>") or t.startswith("<unused") else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
