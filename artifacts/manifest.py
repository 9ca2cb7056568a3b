"""`mlcc-manifest.json`: what an artifact holds and how to check it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from artifacts.errors import MlccError

FORMAT_VERSION = 1
MANIFEST_NAME = "mlcc-manifest.json"


@dataclass
class Manifest:
    """Everything the runtime needs to know about an artifact, without the compiler."""

    arch: str
    model_config: dict[str, Any]
    quant: dict[str, Any]
    target: dict[str, Any]
    library: str
    weights: dict[str, Any]  # {"shards": [...], "params": [names in call order]}
    tokenizer: dict[str, Any]  # {"files": [...], "bos_token", "eos_token", "eos_token_ids", ...}
    context_window: int
    kv_cache: dict[str, Any]  # page_size, prefill_chunk_size, sliding_window, ...
    chat_template: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"sha256", "size"}
    format_version: int = FORMAT_VERSION

    def write(self, folder: Path) -> None:
        (folder / MANIFEST_NAME).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each file, for the manifest."""
    return {name: {"size": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)} for name in names}


def load_manifest(folder: str | Path) -> Manifest:
    """Read and sanity-check a manifest; every problem is a one-line MlccError."""
    folder = Path(folder)
    if not folder.exists():
        raise MlccError(f"artifact not found: {folder}")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise MlccError(f"not an mlcc artifact (no {MANIFEST_NAME}): {folder}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlccError(f"corrupted manifest {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("format_version"), int):
        raise MlccError(f"corrupted manifest {path}: no format_version")
    if data["format_version"] > FORMAT_VERSION:
        raise MlccError(
            f"artifact format {data['format_version']} is newer than this mlcc reads ({FORMAT_VERSION}); upgrade mlcc"
        )
    try:
        return Manifest(**data)
    except TypeError as e:
        raise MlccError(f"corrupted manifest {path}: {e}") from None


def verify_files(folder: str | Path, manifest: Manifest, check_hashes: bool = True) -> None:
    """Check every listed file exists with the right size (and sha256)."""
    folder = Path(folder)
    for name, info in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise MlccError(f"artifact file missing: {path}")
        if path.stat().st_size != info["size"]:
            raise MlccError(f"artifact file has the wrong size (truncated?): {path}")
        if check_hashes and sha256_of(path) != info["sha256"]:
            raise MlccError(f"artifact file checksum mismatch (corrupted): {path}")
