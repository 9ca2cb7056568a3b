"""One-file packages of an artifact, for copying to edge devices: `model.mlcc`.

A package is a tar (zstd-compressed when the `zstandard` module is there, else gzip) holding the artifact's
files and its manifest, which lists the sha256 of every member. It is unpacked once into a cache folder
named after the package's own sha256 and checked there; later runs reuse that folder.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path
from typing import IO

from artifacts.errors import MlccError
from artifacts.manifest import MANIFEST_NAME, load_manifest, sha256_of, verify_files

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


def _zstandard():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def cache_root() -> Path:
    return Path(os.environ.get("MLCC_CACHE", Path.home() / ".cache" / "mlcc")) / "packages"


def write_package(artifact: str | Path, output: str | Path, compression: str = "auto") -> str:
    """Pack a verified artifact folder into one file; returns the compression used (zstd, gzip or none)."""
    artifact, output = Path(artifact), Path(output)
    manifest = load_manifest(artifact)
    verify_files(artifact, manifest)
    if compression == "auto":
        compression = "zstd" if _zstandard() else "gzip"
    if compression == "zstd" and _zstandard() is None:
        raise MlccError("zstd compression needs the zstandard module (pip install zstandard)")
    members = [MANIFEST_NAME, *manifest.files]
    partial = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        with open(partial, "wb") as raw:
            if compression == "zstd":
                with _zstandard().ZstdCompressor(level=10).stream_writer(raw) as stream:
                    _write_tar(stream, artifact, members, "w|")
            else:
                _write_tar(raw, artifact, members, "w|gz" if compression == "gzip" else "w|")
        partial.replace(output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return compression


def _write_tar(stream: IO[bytes], folder: Path, members: list[str], mode: str) -> None:
    with tarfile.open(fileobj=stream, mode=mode) as tar:
        for name in members:
            tar.add(folder / name, arcname=name, recursive=False)


def _open_tar(path: Path, stream: IO[bytes]) -> tarfile.TarFile:
    head = stream.read(4)
    stream.seek(0)
    if head.startswith(ZSTD_MAGIC):
        zstandard = _zstandard()
        if zstandard is None:
            raise MlccError(f"{path} is zstd-compressed; install the zstandard module to read it")
        return tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(stream), mode="r|")
    return tarfile.open(fileobj=stream, mode="r|gz" if head.startswith(GZIP_MAGIC) else "r|")


def unpack_package(path: str | Path, check_hashes: bool = True) -> Path:
    """The folder a package unpacks to (unpacked and verified on first use); one-line errors if damaged."""
    path = Path(path)
    if not path.is_file():
        raise MlccError(f"package not found: {path}")
    folder = cache_root() / sha256_of(path)
    if (folder / MANIFEST_NAME).is_file():
        verify_files(folder, load_manifest(folder), check_hashes=check_hashes)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        _extract(path, partial)
        if not (partial / MANIFEST_NAME).is_file():
            raise MlccError(f"not an mlcc package (no {MANIFEST_NAME}): {path}")
        verify_files(partial, load_manifest(partial))
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    except MlccError as e:
        raise MlccError(f"corrupted package {path}: {e}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _extract(path: Path, into: Path) -> None:
    zstandard = _zstandard()
    read_errors = (tarfile.TarError, EOFError, OSError) + ((zstandard.ZstdError,) if zstandard else ())
    try:
        with open(path, "rb") as f, _open_tar(path, f) as tar:
            for member in tar:
                if not member.isfile() or "/" in member.name or member.name.startswith("."):
                    raise MlccError(f"unexpected member {member.name!r}")
                with open(into / member.name, "wb") as out:
                    shutil.copyfileobj(tar.extractfile(member), out)
    except read_errors as e:
        raise MlccError(f"cannot read it (truncated?): {e}") from None
