"""Where a model comes from: a local Hugging Face folder or a hub id. Tensors are read one at a time."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

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

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the file headers alone."""
        shapes = {}
        for path in self.weight_files:
            try:
                with safe_open(str(path), framework="numpy") as f:
                    shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
            except (SafetensorError, OSError) as e:
                raise MlccError(f"cannot read {path}: {e}") from None
        return shapes

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every tensor as numpy (bfloat16 widened to float32), one at a time.

        Read with plain file reads, not a memory map: a map keeps every page it has touched resident, so the
        process would grow to the size of the checkpoint; this way memory stays near the largest tensor."""
        for path in self.weight_files:
            with open(path, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                try:
                    header = json.loads(fh.read(header_len))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise MlccError(f"cannot read {path}: invalid header: {e}") from None
                for name, info in header.items():
                    if name != "__metadata__":
                        yield name, _read_tensor(fh, 8 + header_len, info, path, name)


SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 below: numpy has no bfloat16
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_tensor(fh: BinaryIO, data_start: int, info: dict[str, Any], path: Path, name: str) -> np.ndarray:
    if info["dtype"] not in SAFETENSORS_DTYPES:
        raise MlccError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    fh.seek(data_start + start)
    raw = fh.read(end - start)
    if len(raw) != end - start:
        raise MlccError(f"cannot read {path}: tensor {name} is truncated")
    array = np.frombuffer(raw, dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    if info["dtype"] == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


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
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:  # no network (or offline mode) and not in the hub's cache
        raise MlccError(
            f"cannot download {repo_id}: the Hugging Face hub is unreachable and the model is not in its local cache"
        ) from None
    except Exception as e:  # auth, missing repo, ...: all one line for the user (hub messages span lines)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MlccError(f"cannot download {repo_id} from the Hugging Face hub: {type(e).__name__}: {first}") from None


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
