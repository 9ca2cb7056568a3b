"""One-file packages of an artifact, for copying to edge devices: `model.mlcc`.

A package is a tar (zstd-compressed when the `zstandard` module is there, else gzip) holding the artifact's
files and its manifest (the first member), which lists the size and sha256 of every other member. It is
unpacked once into a cache folder named after the package's own sha256 and checked there; later runs reuse
that folder. Only the members the manifest lists are unpacked, none larger than listed.
"""

from __future__ import annotations

import errno
import os
import shutil
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from artifacts.errors import MlccError
from artifacts.manifest import MANIFEST_NAME, load_manifest, sha256_of, verify_files
from artifacts.partials import partial_path, remove_stale_partials

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
MAX_MANIFEST_BYTES = 64 << 20


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


class CacheDiskError(MlccError):
    """Unpacking failed on the cache's disk (full, read-only, no permission), not because of the package."""


@contextmanager
def _cache_disk() -> Iterator[None]:
    try:
        yield
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise CacheDiskError("no space left on the device" if full else (e.strerror or str(e))) from None


def unpack_package(path: str | Path, check_hashes: bool = True) -> Path:
    """The folder a package unpacks to (unpacked and verified on first use); one-line errors if damaged."""
    path = Path(path)
    if not path.is_file():
        raise MlccError(f"package not found: {path}")
    folder = cache_root() / sha256_of(path)
    if (folder / MANIFEST_NAME).is_file():
        verify_files(folder, load_manifest(folder), check_hashes=check_hashes)
        return folder
    partial = partial_path(folder)
    try:
        with _cache_disk():
            folder.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(folder.parent)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        _extract(path, partial)
        verify_files(partial, load_manifest(partial))
        with _cache_disk():
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
    except CacheDiskError as e:
        raise MlccError(f"cannot unpack {path} into {folder.parent}: {e}") from None
    except MlccError as e:
        raise MlccError(f"corrupted package {path}: {e}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _extract(path: Path, into: Path) -> None:
    """Unpack the manifest (the first member), then only the files it lists, each no larger than it says.

    Anything else (an unlisted or oversized member, a link, a folder) is refused before its data is read,
    so a package cannot fill the disk with more than its manifest declares."""
    zstandard = _zstandard()
    read_errors = (tarfile.TarError, EOFError, OSError) + ((zstandard.ZstdError,) if zstandard else ())
    try:
        with open(path, "rb") as f, _open_tar(path, f) as tar:
            expected: dict[str, int] | None = None
            for member in tar:
                if expected is None:
                    if member.name != MANIFEST_NAME or not member.isfile():
                        raise MlccError(f"not an mlcc package (its first member is not {MANIFEST_NAME})")
                    if member.size > MAX_MANIFEST_BYTES:
                        raise MlccError(f"its manifest is {member.size} bytes, more than a manifest can be")
                    _copy_member(tar, member, into)
                    manifest = load_manifest(into)
                    expected = {name: info["size"] for name, info in manifest.files.items()}
                    _check_free_space(into, sum(expected.values()))
                    continue
                if not member.isfile() or member.name not in expected:
                    raise MlccError(f"member {member.name!r} is not listed in its manifest")
                if member.size != expected.pop(member.name):
                    raise MlccError(f"member {member.name!r} is {member.size} bytes, not the size its manifest lists")
                _copy_member(tar, member, into)
            if expected is None:
                raise MlccError(f"not an mlcc package (no {MANIFEST_NAME})")
    except read_errors as e:
        raise MlccError(f"cannot read it (truncated?): {e}") from None


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, into: Path) -> None:
    """Write one member's data; a read error is the package's fault, a write error the disk's."""
    source = tar.extractfile(member)
    with _cache_disk():
        out = open(into / member.name, "wb")
    with out:
        while block := source.read(1 << 20):
            with _cache_disk():
                out.write(block)
        with _cache_disk():
            out.flush()


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CacheDiskError(f"no space left on the device ({needed >> 20} MiB needed, {free >> 20} MiB free)")
