"""Loads an artifact with TVM's runtime alone: library, weights, tokenizer."""

from __future__ import annotations

import contextlib
import mmap
import platform
from pathlib import Path

import numpy as np
import tvm
from safetensors import SafetensorError, safe_open
from tvm.runtime.vm import VirtualMachine

from artifacts import Manifest, MlccError, load_manifest, verify_files
from artifacts.host_cpu import AMX_FLAGS, enable_amx
from artifacts.host_cpu import cpu_flags as _host_cpu_flags
from artifacts.package import unpack_package
from runtime.tokenizer import Tokenizer

DEVICES = {
    "cpu": tvm.cpu,
    "cuda": tvm.cuda,
    "metal": tvm.metal,
    "vulkan": tvm.vulkan,
    "opencl": tvm.opencl,
    "webgpu": lambda index: tvm.device("webgpu", index),
}
HUGE_PAGE = 2 << 20  # x86-64's and arm64's transparent huge page
TENSOR_ALIGNMENT = 64  # what TVM's kernels assume of a tensor's data
# ELF e_machine -> the names platform.machine() gives that architecture.
ELF_MACHINES = {62: ("x86_64", "amd64"), 183: ("aarch64", "arm64"), 40: ("armv7l", "arm"), 243: ("riscv64",)}


def _check_library_loadable(library: Path, target: dict) -> None:
    """A one-line error for libraries this host cannot load: unlinked objects, another CPU's machine code.
    A library with AMX kernels gets the process's tile state here, before it runs."""
    if library.suffix == ".tar":
        raise MlccError(
            f"{library.name} holds unlinked {target.get('name')} objects; link them into a library on the "
            "device first (README: Targets and packaging)"
        )
    with open(library, "rb") as f:
        header = f.read(20)
    if header[:4] != b"\x7fELF":
        return
    machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    host = platform.machine().lower()
    names = ELF_MACHINES.get(machine, (f"ELF machine {machine}",))
    if host not in names:
        raise MlccError(f"{library.name} is machine code for {names[0]} and this host is {host}; run it on {names[0]}")
    needed, present = target.get("cpu_flags") or [], _host_cpu_flags()
    missing = [str(flag) for flag in needed if flag not in present] if isinstance(needed, list) and present else []
    if missing:
        raise MlccError(
            f"{library.name} needs {', '.join(missing)} (compiled with --cpu {target.get('cpu')}), which this CPU "
            "lacks; compile it here (--cpu host) or for any x86-64 CPU (--cpu x86-64-v2)"
        )
    if isinstance(needed, list) and any(flag in AMX_FLAGS for flag in needed):
        enable_amx()


def _load_cuda_runtime() -> None:
    """A runtime-only TVM does not load its CUDA runtime at import; load it for a CUDA artifact."""
    if tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        return
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (OSError, FileNotFoundError, RuntimeError):
        return  # no CUDA driver or runtime here: the device check says so


class LoadedArtifact:
    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        if self.path.is_file():  # a one-file package: unpacked and verified once, then reused from the cache
            self.path = unpack_package(self.path, check_hashes=verify)
        self.manifest: Manifest = load_manifest(self.path)
        verify_files(self.path, self.manifest, check_hashes=verify)
        device_kind = self.manifest.target["device"]
        if device_kind not in DEVICES:
            raise MlccError(f"unknown device kind in manifest: {device_kind}")
        _check_library_loadable(self.path / self.manifest.library, self.manifest.target)
        if device_kind == "cuda":
            _load_cuda_runtime()
        self.device = DEVICES[device_kind](0)
        if not self.device.exist:
            raise MlccError(f"this artifact needs a {device_kind} device, and none is available")
        try:
            library = tvm.runtime.load_module(str(self.path / self.manifest.library))
        except Exception as e:  # a damaged or foreign library
            raise MlccError(f"cannot load {self.manifest.library}: {str(e).splitlines()[0]}") from None
        self.vm = VirtualMachine(library, self.device)
        self.params = self._load_weights()
        self.tokenizer = Tokenizer(self.path, self.manifest.tokenizer, self.manifest.chat_template)

    def _load_weights(self) -> list[tvm.runtime.Tensor]:
        arrays: dict[str, np.ndarray] = {}
        for shard in self.manifest.weights["shards"]:
            try:
                with safe_open(str(self.path / shard), framework="numpy") as f:
                    arrays.update({name: f.get_tensor(name) for name in f.keys()})
            except (SafetensorError, OSError) as e:
                raise MlccError(f"cannot read weight shard {shard}: {e}") from None
        arrays.update(_empty_adapter_slots(self.manifest.lora_slots))
        aliases = self.manifest.weights.get("aliases", {})  # a tied head equal to the embedding: one tensor
        names = self.manifest.weights["params"]
        stored = [n for n in names if n not in aliases]
        missing = [n for n in stored if n not in arrays]
        if missing:
            raise MlccError(f"weight shards lack {len(missing)} parameters (e.g. {missing[0]})")
        if self.manifest.target["device"] == "cpu" and hasattr(mmap, "MAP_ANONYMOUS"):  # POSIX
            tensors = dict(zip(stored, _in_huge_pages(arrays, stored)))
        else:
            tensors = {name: tvm.runtime.tensor(arrays.pop(name), self.device) for name in stored}
        return [tensors[aliases.get(name, name)] for name in names]


def _in_huge_pages(arrays: dict[str, np.ndarray], names: list[str]) -> list[tvm.runtime.Tensor]:
    """CPU weights moved into one anonymous mapping that the kernel may back with 2 MB pages (asked for with
    madvise: transparent huge pages in their `madvise` mode come only so; in `always` they come anyway), as TVM
    tensors over it. A decode step streams every weight once; in 4 KB pages each page costs a TLB miss and stops
    the hardware prefetchers at its end (Q4_K 2048x8192 one-token kernel streaming from memory, 2 threads:
    25.4-26.1 -> 28.0-28.1 GB/s)."""
    offsets, size = [], 0
    for name in names:
        offsets.append(size)
        size += -(-arrays[name].nbytes // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no transparent huge pages here: 4 KB ones then
        region.madvise(mmap.MADV_HUGEPAGE)
    memory = np.frombuffer(region, np.uint8)
    memory = memory[-memory.ctypes.data % HUGE_PAGE :]
    tensors = []
    for name, offset in zip(names, offsets):
        array = arrays.pop(name)  # the file's copy goes as its tensor is made
        view = memory[offset : offset + array.nbytes].view(array.dtype).reshape(array.shape)
        view[...] = array
        tensors.append(tvm.runtime.from_dlpack(view))
    return tensors


def _empty_adapter_slots(section: dict | None) -> dict[str, np.ndarray]:
    """Zero LoRA factors for every slotted module (the artifact ships none; runtime/adapters.py fills slots)."""
    if not section:
        return {}
    columns = section["slots"] * section["rank"]
    dtype = np.dtype(section.get("dtype", "float32"))
    arrays = {}
    for path, shape in section["modules"].items():
        arrays[f"{path}.lora.a"] = np.zeros((columns, shape["in"]), dtype)
        arrays[f"{path}.lora.b"] = np.zeros((shape["out"], columns), dtype)
    return arrays
