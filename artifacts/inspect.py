"""`mlcc inspect`: what an artifact or package holds, and whether its files match their checksums."""

from __future__ import annotations

from pathlib import Path

from artifacts.errors import MlccError
from artifacts.manifest import MANIFEST_NAME, load_manifest, verify_files
from artifacts.package import unpack_package


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def inspect_artifact(path: str | Path) -> tuple[list[tuple[str, str]], bool]:
    """(label, value) rows describing the artifact, and whether every checksum is valid."""
    path = Path(path)
    rows: list[tuple[str, str]] = []
    if path.is_file():
        rows.append(("package", f"{path} ({_size(path.stat().st_size)})"))
        folder = unpack_package(path)  # verifies every member; a damaged package is a one-line error
        rows.append(("unpacked to", str(folder)))
    else:
        folder = path
    manifest = load_manifest(folder)
    try:
        verify_files(folder, manifest)
        valid, checksums = True, f"valid ({len(manifest.files)} files, sha256)"
    except MlccError as e:
        valid, checksums = False, f"INVALID: {e}"
    target = manifest.target
    target_text = f"{target.get('name')} (device {target.get('device')}; {target.get('tvm_target')})"
    if target.get("cuda_archs"):
        target_text += f"; CUDA fatbin for {', '.join(target['cuda_archs'])}"
    # GGUF builds before mlcc recorded their bits per weight carry 0.0: say nothing rather than that.
    quant = {k: v for k, v in manifest.quant.items() if not (k == "bits_per_weight" and not v)}
    cfg = manifest.model_config
    shape = ", ".join(f"{k} {cfg[k]}" for k in ("num_layers", "hidden_size", "vocab_size") if k in cfg)
    rows += [
        ("arch", f"{manifest.arch}" + (f" ({shape})" if shape else "")),
        ("quant", f"{quant.get('name')} ({', '.join(f'{k} {v}' for k, v in sorted(quant.items()) if k != 'name')})"),
        ("target", target_text),
        ("library", f"{manifest.library} ({_size(manifest.files.get(manifest.library, {}).get('size', 0))})"),
        ("weights", f"{len(manifest.weights['shards'])} shards, {_size(manifest.weights.get('bytes', 0))}"),
        ("total size", _size(sum(f["size"] for f in manifest.files.values()))),
        ("context window", str(manifest.context_window)),
        ("versions", ", ".join(f"{k} {v}" for k, v in sorted(manifest.versions.items()))),
        ("format", f"{manifest.format_version} ({MANIFEST_NAME})"),
        ("checksums", checksums),
    ]
    return rows, valid
