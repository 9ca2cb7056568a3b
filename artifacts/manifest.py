"""`mlcc-manifest.json`: what an artifact holds and how to check it."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from artifacts.errors import MlccError

FORMAT_VERSION = 1
MANIFEST_NAME = "mlcc-manifest.json"
# An artifact file is one plain name inside the artifact folder: no folders, no "..", no hidden files.
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}")
SHA256 = re.compile(r"[0-9a-f]{64}")
KV_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass
class Manifest:
    """Everything the runtime needs to know about an artifact, without the compiler."""

    arch: str
    model_config: dict[str, Any]
    quant: dict[str, Any]
    target: dict[str, Any]
    library: str
    weights: dict[str, Any]  # {"shards": [...], "params": [names in call order], "aliases": {name: stored name}}
    tokenizer: dict[str, Any]  # {"files": [...], "bos_token", "eos_token", "eos_token_ids", ...}
    context_window: int
    kv_cache: dict[str, Any]  # page_size, prefill_chunk_size, sliding_window, ...
    chat_template: str | None = None
    # Adapter slots (`mlcc compile --lora-slots`): slots, rank, dtype, modules {path: {in, out, source}},
    # module_order [paths] (the module axis of the library's `lora_scalings` input).
    lora_slots: dict[str, Any] | None = None
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
        manifest = Manifest(**data)
    except TypeError as e:
        raise MlccError(f"corrupted manifest {path}: {e}") from None
    problem = manifest_problem(manifest)
    if problem:
        raise MlccError(f"corrupted manifest {path}: {problem}")
    return manifest


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def manifest_problem(m: Manifest) -> str | None:
    """What is wrong with a manifest's fields, or None. Every file the runtime opens (library, shards,
    tokenizer.json) must be a plain name listed in `files` with its size and sha256, so it is checked first."""
    if not _positive_int(m.format_version):
        return f"format_version must be a positive integer, not {m.format_version!r}"
    for name in ("model_config", "quant", "target", "weights", "tokenizer", "kv_cache", "versions", "files"):
        if not isinstance(getattr(m, name), dict):
            return f"{name} must be an object"
    if not isinstance(m.arch, str) or not m.arch:
        return "arch must be a name"
    if not isinstance(m.target.get("device"), str):
        return "target.device must be a name"
    if not isinstance(m.chat_template, (str, type(None))):
        return "chat_template must be text"
    for name, info in m.files.items():
        if not FILE_NAME.fullmatch(name):
            return f"file {name!r} is not a plain file name inside the artifact"
        if not isinstance(info, dict) or not (isinstance(info.get("size"), int) and info["size"] >= 0):
            return f"file {name!r} has no valid size"
        if not isinstance(info.get("sha256"), str) or not SHA256.fullmatch(info["sha256"]):
            return f"file {name!r} has no valid sha256"
    shards, params = m.weights.get("shards"), m.weights.get("params")
    tokenizer_files = m.tokenizer.get("files")
    if not (isinstance(shards, list) and isinstance(params, list) and all(isinstance(p, str) for p in params)):
        return "weights must list shards and params"
    aliases = m.weights.get("aliases", {})
    if not isinstance(aliases, dict) or any(
        name not in params or stored not in params or stored in aliases for name, stored in aliases.items()
    ):
        return "weights.aliases must map parameters to stored parameters"
    if not isinstance(tokenizer_files, list):
        return "tokenizer must list its files"
    for role, names in (("library", [m.library]), ("weight shard", shards), ("tokenizer file", tokenizer_files)):
        for name in names:
            if not isinstance(name, str) or name not in m.files:
                return f"{role} {name!r} is not one of the artifact's checksummed files"
    if "tokenizer.json" not in tokenizer_files:
        return "tokenizer files lack tokenizer.json"
    if not _positive_int(m.context_window):
        return f"context_window must be a positive integer, not {m.context_window!r}"
    for key in ("page_size", "prefill_chunk_size", "max_batch_size"):
        if not _positive_int(m.kv_cache.get(key)):
            return f"kv_cache.{key} must be a positive integer, not {m.kv_cache.get(key)!r}"
    if m.kv_cache.get("sliding_window") is not None and not _positive_int(m.kv_cache["sliding_window"]):
        return f"kv_cache.sliding_window must be a positive integer or null, not {m.kv_cache['sliding_window']!r}"
    if m.kv_cache.get("dtype") not in KV_DTYPES:
        return f"kv_cache.dtype must be one of {', '.join(KV_DTYPES)}, not {m.kv_cache.get('dtype')!r}"
    for key in ("num_layers", "num_kv_heads", "head_dim"):
        if not _positive_int(m.model_config.get(key)):
            return f"model_config.{key} must be a positive integer, not {m.model_config.get(key)!r}"
    vocab = m.model_config.get("vocab_size")
    if vocab is not None and not _positive_int(vocab):
        return f"model_config.vocab_size must be a positive integer, not {vocab!r}"
    return _lora_slots_problem(m.lora_slots)


def _lora_slots_problem(section: Any) -> str | None:
    if section is None:
        return None
    if not isinstance(section, dict) or not (
        _positive_int(section.get("slots")) and _positive_int(section.get("rank"))
    ):
        return "lora_slots must give positive integer slots and rank"
    modules = section.get("modules")
    if not isinstance(modules, dict) or not all(
        isinstance(v, dict)
        and _positive_int(v.get("in"))
        and _positive_int(v.get("out"))
        and isinstance(v.get("source"), str)
        for v in modules.values()
    ):
        return "lora_slots.modules must give each module's in, out and source name"
    order = section.get("module_order")
    if not isinstance(order, list) or sorted(map(str, order)) != sorted(modules) or len(order) != len(modules):
        return "lora_slots.module_order must list its modules (an artifact of an older mlcc: compile it again)"
    return None


def verify_files(folder: str | Path, manifest: Manifest, check_hashes: bool = True) -> None:
    """Check every listed file is a plain file with the right size and sha256. Without `check_hashes` the
    (large) weights are only sized, but the library, which is code, is always hashed."""
    folder = Path(folder)
    for name, info in manifest.files.items():
        path = folder / name
        if path.is_symlink():
            raise MlccError(f"artifact file is a symbolic link, not a file inside the artifact: {path}")
        if not path.is_file():
            raise MlccError(f"artifact file missing: {path}")
        if path.stat().st_size != info["size"]:
            raise MlccError(f"artifact file has the wrong size (truncated?): {path}")
        if (check_hashes or name == manifest.library) and sha256_of(path) != info["sha256"]:
            raise MlccError(f"artifact file checksum mismatch (corrupted): {path}")
