"""A GGUF file as a model source: config, tensors, tokenizer and chat template all from its metadata."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from artifacts.errors import MlccError

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
# Tensors that hold RoPE parameters, not weights (Phi-3's LongRoPE factors): read into the metadata.
ROPE_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")
# End-of-turn markers of chat models, which stop generation like EOS does.
END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")
# llama.cpp pre-tokenizer names -> the equivalent `tokenizers` pre-tokenizer.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if name in ("gpt2", "default", ""):
        return byte_level
    raise MlccError(f"GGUF pre-tokenizer {name!r} is not supported yet; supported: smollm, starcoder, gpt2")


class GGUFSource:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.reader = GGUFReader(str(path))
        except Exception as e:  # gguf raises ValueError/struct errors/OSError on damaged files
            raise MlccError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from None
        self.meta = {name: self._value(name) for name in self.reader.fields}
        self.arch = str(self.meta.get("general.architecture", ""))
        self.tensors_by_name = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:  # a truncated file shows up as a tensor shorter than it claims
            if t.data.nbytes != t.n_bytes:
                raise MlccError(f"GGUF file is truncated or corrupted: tensor {t.name} is incomplete ({path})")

    def _value(self, name: str) -> Any:
        field = self.reader.fields[name]
        if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.data) > 4096:
            return None  # big arrays (the vocabulary) are read on demand
        try:
            return field.contents()
        except Exception:
            return None

    def array(self, name: str) -> list[Any]:
        return self.reader.fields[name].contents() if name in self.reader.fields else []

    def arch_meta(self) -> dict[str, Any]:
        prefix = f"{self.arch}."
        meta = {k[len(prefix) :]: v for k, v in self.meta.items() if k.startswith(prefix)}
        meta.setdefault("vocab_size", len(self.array("tokenizer.ggml.tokens")))
        for name in ROPE_TENSORS:
            if name in self.tensors_by_name:
                meta[name.removesuffix(".weight")] = np.asarray(self.tensors_by_name[name].data, np.float32).tolist()
        return meta

    def _by_name(self, value: Callable[[ReaderTensor], Any]) -> dict[str, Any]:
        """value(tensor) for each tensor by name; a tied output head reads as token_embd."""
        values = {t.name: value(t) for t in self.reader.tensors}
        if "output.weight" not in values and "token_embd.weight" in values:
            values["output.weight"] = values["token_embd.weight"]
        return values

    def tensor_types(self) -> dict[str, GGMLQuantizationType]:
        return self._by_name(lambda t: GGMLQuantizationType(t.tensor_type))

    def tensor_rows(self) -> dict[str, int]:
        """Rows (output features) of each tensor, as tensor_types names them."""
        return self._by_name(lambda t: int(t.shape[1]) if len(t.shape) > 1 else 1)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape as [rows, cols] (GGUF lists the dimensions innermost first)."""
        return {t.name: tuple(int(d) for d in reversed(t.shape)) for t in self.reader.tensors}

    def tensors(self, raw: bool) -> Iterator[tuple[str, np.ndarray]]:
        """(GGUF name, array): the raw blocks when `raw`, else float32 in [rows, cols]."""
        for t in self.reader.tensors:
            if t.name in ROPE_TENSORS:
                continue
            qtype = GGMLQuantizationType(t.tensor_type)
            data = np.asarray(t.data)
            if qtype == GGMLQuantizationType.BF16:
                data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif raw and qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                yield t.name, data
                continue
            elif qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                try:
                    data = dequantize(data, qtype)
                except NotImplementedError:
                    raise MlccError(f"cannot dequantize GGUF type {qtype.name} ({t.name})") from None
            yield t.name, data.astype(np.float32).reshape([int(d) for d in reversed(t.shape)])

    def write_tokenizer(self, folder: Path) -> dict[str, Any]:
        """Build tokenizer.json from the GGUF vocabulary; returns the manifest's tokenizer entry."""
        kind = self.meta.get("tokenizer.ggml.model")
        tokens = [str(t) for t in self.array("tokenizer.ggml.tokens")]
        types = self.array("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if kind == "gpt2":
            tok = self._byte_level_bpe(tokens)
        elif kind == "llama":
            tok = self._sentencepiece_bpe(tokens, types)
        else:
            raise MlccError(f"GGUF tokenizer model {kind!r} is not supported yet; supported: gpt2, llama")
        # Control tokens are special (left out of decoded text); user-defined ones (e.g. Gemma's runs of
        # spaces) are matched whole like them but decode as text, as llama.cpp does.
        specials = [t for t, kind in zip(tokens, types) if kind == CONTROL]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        user = [t for t, kind in zip(tokens, types) if kind == USER_DEFINED]
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
        bos_id, eos_id = self.meta.get("tokenizer.ggml.bos_token_id"), self.meta.get("tokenizer.ggml.eos_token_id")
        bos = tokens[bos_id] if bos_id is not None else None
        if self.meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
            tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
        tok.save(str(folder / "tokenizer.json"))
        eos_ids = {i for i in (eos_id, self.meta.get("tokenizer.ggml.eot_token_id")) if i is not None}
        eos_ids |= {tokens.index(t) for t in END_OF_TURN if t in specials}
        config = {"bos_token": bos, "eos_token": tokens[eos_id] if eos_id is not None else None}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        return {
            "files": ["tokenizer.json", "tokenizer_config.json"],
            **config,
            "eos_token_ids": sorted(eos_ids),
            "chat_template": self.meta.get("tokenizer.chat_template"),
        }

    def _byte_level_bpe(self, tokens: list[str]) -> Tokenizer:
        """GPT-2 style byte-level BPE with the merges stored in the file."""
        merges = [tuple(str(m).split(" ", 1)) for m in self.array("tokenizer.ggml.merges")]
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        tok.pre_tokenizer = _pre_tokenizer(str(self.meta.get("tokenizer.ggml.pre") or ""))
        tok.decoder = decoders.ByteLevel()
        return tok

    def _sentencepiece_bpe(self, tokens: list[str], types: list[int]) -> Tokenizer:
        """SentencePiece BPE (llama.cpp's `llama` vocab): spaces as U+2581, byte fallback, and merges derived
        from the piece scores (a higher-scoring piece merges first), as SentencePiece itself ranks them."""
        scores = self.array("tokenizer.ggml.scores") or [0.0] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        normal = {t for t, kind in zip(tokens, types) if kind == NORMAL}
        ranked = []
        for piece in normal:
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in normal and right in normal:
                    ranked.append((-scores[vocab[piece]], vocab[left], vocab[right], left, right))
        merges = [(left, right) for *_, left, right in sorted(ranked)]
        unk_id = self.meta.get("tokenizer.ggml.unknown_token_id")
        tok = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=merges,
                unk_token=tokens[unk_id] if unk_id is not None else None,
                fuse_unk=True,
                byte_fallback=True,
            )
        )
        steps = [normalizers.Replace(" ", "\u2581")]
        if self.meta.get("tokenizer.ggml.add_space_prefix"):
            steps.insert(0, normalizers.Prepend("\u2581"))
        tok.normalizer = normalizers.Sequence(steps)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        return tok
