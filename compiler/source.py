"""Where a model comes from: a local Hugging Face folder or a hub id. Tensors are read one at a time."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from artifacts.errors import MlccError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]


@dataclass
class ModelSource:
    folder: Path
    config: dict[str, Any]
    weight_files: list[Path]
    tokenizer_files: list[Path] = field(default_factory=list)

    def tensor_names(self) -> list[tuple[str, Path]]:
        names = []
        for path in self.weight_files:
            try:
                with safe_open(str(path), framework="numpy") as f:
                    names.extend((name, path) for name in f.keys())
            except (SafetensorError, OSError) as e:
                raise MlccError(f"cannot read {path}: {e}") from None
        return names

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every tensor as float32/int numpy, one at a time, so memory stays near the largest tensor."""
        for path in self.weight_files:
            try:
                with safe_open(str(path), framework="numpy") as f:
                    for name in f.keys():
                        yield name, _read_tensor(f, path, name)
            except SafetensorError as e:
                raise MlccError(f"cannot read {path}: {e}") from None


def _read_tensor(f: Any, path: Path, name: str) -> np.ndarray:
    try:
        return f.get_tensor(name)
    except TypeError:  # numpy has no bfloat16: widen the raw bits to float32
        return _read_bf16(path, name)


def _read_bf16(path: Path, name: str) -> np.ndarray:
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(header_len))[name]
        if info["dtype"] != "BF16":
            raise MlccError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        fh.seek(8 + header_len + start)
        raw = np.frombuffer(fh.read(end - start), dtype=np.uint16)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def _looks_like_hub_id(spec: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None


def resolve_model(spec: str) -> ModelSource:
    """A local folder, or a hub id downloaded with huggingface_hub into its cache."""
    path = Path(spec).expanduser()
    if not path.exists():
        if not _looks_like_hub_id(spec):
            raise MlccError(f"model not found: {spec}")
        path = _download(spec)
    if path.is_file():
        raise MlccError(f"expected a model folder with config.json and *.safetensors: {spec}")
    return _load_folder(path)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, missing repo: all one line for the user
        raise MlccError(f"cannot download {repo_id} from the Hugging Face hub: {type(e).__name__}: {e}") from None


def _load_folder(folder: Path) -> ModelSource:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MlccError(f"no config.json in {folder}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise MlccError(f"invalid config.json in {folder}: {e}") from None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise MlccError(f"no *.safetensors weights in {folder}")
    tokenizer = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not (folder / "tokenizer.json").is_file():
        raise MlccError(f"no tokenizer.json in {folder}")
    return ModelSource(folder, config, weights, tokenizer)
