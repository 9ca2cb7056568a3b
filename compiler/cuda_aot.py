"""CUDA kernels compiled ahead of time: the library carries a fatbin, not CUDA source.

TVM 0.27 embeds the generated CUDA source in the exported library and compiles it when the library is
loaded (NVRTC or nvcc on the device). mlcc compiles that source with nvcc at compile time instead, for every
requested architecture, and rewrites the serialized CUDA module to format "fatbin" (TVM's runtime loads it
with cuModuleLoadData, no compiler needed). The serialized import tree (what `export_library` embeds as
`__tvm_ffi__library_bin`) is:

    u64 nbytes | vec<u64> import-tree row pointers | vec<u64> child indices |
    per module: str type_key, then (unless the key is "_lib", the host library itself) bytes payload

and a "cuda" payload is: str fmt | function map | bytes data (the source for fmt "cuda"), data last.
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import tvm
from tvm.runtime import _ffi_api

from artifacts.errors import MlccError

U64 = struct.Struct("<Q")
HOST_LIBRARY_KEY = b"_lib"

# The flags TVM itself gives nvcc (tvm.support.nvcc), so the kernels match a load-time compile.
NVCC_FLAGS = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
    "--threads",
    "0",  # one nvcc thread per architecture
]


def compile_fatbin(source: str, archs: tuple[str, ...]) -> bytes:
    """Machine code (SASS) for every arch, plus PTX of the newest so later GPUs can JIT it."""
    gencode: list[str] = []
    for arch in archs:
        number = arch.removeprefix("sm_")
        codes = f"[sm_{number},compute_{number}]" if arch == archs[-1] else f"sm_{number}"
        gencode += ["-gencode", f"arch=compute_{number},code={codes}"]
    with tempfile.TemporaryDirectory(prefix="mlcc-nvcc-") as tmp:
        cu, fatbin = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        cu.write_text(source)
        proc = subprocess.run(
            ["nvcc", "--fatbin", *NVCC_FLAGS, *gencode, "-o", str(fatbin), str(cu)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            errors = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "error" in line]
            raise MlccError(f"nvcc failed on the generated kernels: {(errors or ['(no message)'])[0].strip()}")
        return fatbin.read_bytes()


def _read_str(data: bytes, pos: int) -> tuple[bytes, int]:
    (size,) = U64.unpack_from(data, pos)
    return data[pos + 8 : pos + 8 + size], pos + 8 + size


def _read_vec(data: bytes, pos: int) -> tuple[list[int], int]:
    (count,) = U64.unpack_from(data, pos)
    return [U64.unpack_from(data, pos + 8 + 8 * i)[0] for i in range(count)], pos + 8 + 8 * count


def _str(value: bytes) -> bytes:
    return U64.pack(len(value)) + value


def _vec(values: list[int]) -> bytes:
    return U64.pack(len(values)) + b"".join(U64.pack(v) for v in values)


def _cuda_payload_as_fatbin(payload: bytes, sources: dict[bytes, bytes]) -> bytes:
    """Swap the source at the end of a serialized CUDA module for its fatbin and set fmt to "fatbin"."""
    fmt, fmap_start = _read_str(payload, 0)
    for source, fatbin in sources.items():
        data_start = len(payload) - len(source) - 8
        if (
            payload.endswith(source)
            and data_start >= fmap_start
            and U64.unpack_from(payload, data_start)[0] == len(source)
        ):
            return _str(b"fatbin") + payload[fmap_start:data_start] + _str(fatbin)
    raise MlccError(f"unexpected layout of TVM's serialized CUDA module (format {fmt.decode()!r})")


def imports_with_fatbin(blob: bytes, sources: dict[bytes, bytes]) -> bytes:
    """Rewrite every CUDA module in a serialized import tree; other modules are copied as they are."""
    row_ptr, pos = _read_vec(blob, 8)
    children, pos = _read_vec(blob, pos)
    out = [_vec(row_ptr), _vec(children)]
    for _ in range(len(row_ptr) - 1):
        key, pos = _read_str(blob, pos)
        out.append(_str(key))
        if key == HOST_LIBRARY_KEY:
            continue
        payload, pos = _read_str(blob, pos)
        out.append(_str(_cuda_payload_as_fatbin(payload, sources) if key == b"cuda" else payload))
    body = b"".join(out)
    return U64.pack(len(body)) + body


def _cuda_sources(module: tvm.runtime.Module) -> list[str]:
    found, stack, seen = [], [module], set()
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        if m.kind == "cuda":
            found.append(m.inspect_source())
        stack.extend(m.imports)
    return found


def fatbin_packer(archs: tuple[str, ...]) -> Callable[[tvm.runtime.Module, bool, str, str], str]:
    """An `fpack_imports` for export_library: the import tree with fatbins, as an assembler file to link."""

    def pack(module: tvm.runtime.Module, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        sources = {src.encode(): compile_fatbin(src, archs) for src in _cuda_sources(module)}
        blob = bytes(_ffi_api.ModulePackImportsToTensor(module).numpy())
        blob_path = os.path.join(workspace_dir, "imports.bin")
        Path(blob_path).write_bytes(imports_with_fatbin(blob, sources))
        symbol = symbol_prefix + _ffi_api.ModuleImportsBlobName()
        asm_path = os.path.join(workspace_dir, "imports.S")
        Path(asm_path).write_text(
            "\t.section .rodata\n\t.balign 16\n"
            f"\t.globl {symbol}\n\t.type {symbol}, @object\n{symbol}:\n"
            f'\t.incbin "{blob_path}"\n\t.size {symbol}, . - {symbol}\n'
            '\t.section .note.GNU-stack,"",@progbits\n'
        )
        return asm_path

    return pack


FATBIN_MAGIC = 0xBA55ED50
FATBIN_ELF = 2
FATBIN_ENTRY = struct.Struct("<HHIQ")  # kind, version, header size, payload size


def fatbin_architectures(data: bytes) -> list[str]:
    """The SASS architectures (sm_XX) of every fatbin found in `data` (a library, or a fatbin itself).

    A fatbin is a 16-byte header (magic, version, header size, u64 size of the entries) followed by entries,
    each a header (u16 kind: 1 PTX, 2 ELF; u32 header size at 4; u64 payload size at 8; u32 arch at 28)
    and its payload."""
    archs: list[str] = []
    start = data.find(struct.pack("<I", FATBIN_MAGIC))
    while start >= 0:
        header_size, entries_size = struct.unpack_from("<HQ", data, start + 6)
        pos, end = start + header_size, start + header_size + entries_size
        while pos < end:
            kind, _version, entry_header, payload = FATBIN_ENTRY.unpack_from(data, pos)
            (arch,) = struct.unpack_from("<I", data, pos + 28)
            if kind == FATBIN_ELF:
                archs.append(f"sm_{arch}")
            pos += entry_header + payload
        start = data.find(struct.pack("<I", FATBIN_MAGIC), end)
    return sorted(set(archs), key=lambda a: int(a[3:]))
