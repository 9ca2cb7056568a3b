"""Compilation targets. Each names a TVM target, the runtime device and how the library is exported.

A `TargetRequest` is what the user asked for (plain strings, picklable, so the build child process can
resolve it again); `resolve_target` turns it into a `TargetSpec` or a one-line MlccError.
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass, field, replace

import tvm
from tvm.target import Target

from artifacts.errors import MlccError
from artifacts.host_cpu import cpu_flags

# Supported, and the default: Ampere (A100, RTX 30xx), Ada (L4, RTX 40xx), Hopper (H100, H200).
CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
DEFAULT_METAL_TAG = "apple/m2-gpu"
AARCH64_CROSS_CC = "aarch64-linux-gnu-gcc"
# x86-64 microarchitecture levels: v2 (SSE4.2, any x86-64 CPU of the last 15 years), v3 (AVX2, FMA), v4 (AVX-512).
X86_LEVELS = ("x86-64-v2", "x86-64-v3", "x86-64-v4")
CPUS = ("host", "aarch64", *X86_LEVELS)
# LLVM's name of an x86 instruction set a CPU may lack -> Linux's /proc/cpuinfo flag for it.
X86_FEATURE_FLAGS = {
    "sse4.2": "sse4_2",
    "popcnt": "popcnt",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512dq": "avx512dq",
    "avx512vl": "avx512vl",
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16",
    "avxvnni": "avx_vnni",
    "amx-tile": "amx_tile",
    "amx-int8": "amx_int8",
}
# LLVM's fast-math reassociation lets it vectorize the dot products, as llama.cpp's SIMD sums do.
FAST_MATH = {"fast-math-reassoc": True, "fast-math-contract": True}


@dataclass(frozen=True)
class TargetRequest:
    name: str = "llvm"  # llvm, cuda, metal, webgpu, vulkan, or an Apple GPU tag such as apple/m1-gpu
    cuda_archs: tuple[str, ...] = ()
    cpu: str = "host"  # llvm only: host, aarch64 or an x86-64 level (x86-64-v2, -v3, -v4)


@dataclass
class TargetSpec:
    name: str
    target: Target
    device: str  # the runtime's device kind: "cpu", "cuda", "metal", ...
    library_name: str  # model.so (loadable) or model.tar (objects still to be linked on the device)
    cuda_archs: tuple[str, ...] = ()
    cross_compiler: str | None = None  # a C compiler for another architecture (llvm --cpu aarch64)
    extra: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict:
        info = {"name": self.name, "device": self.device, "tvm_target": str(self.target), **self.extra}
        if self.target.host is not None:
            info["host"] = str(self.target.host)
        if self.cuda_archs:
            info["cuda_archs"] = list(self.cuda_archs)
        return info


def strict_float(spec: TargetSpec) -> TargetSpec:
    """The spec with LLVM's float reassociation off, for kernels whose order of operations is the point."""
    if spec.target.kind.name != "llvm":
        return spec
    config = {k: v for k, v in spec.target.export().items() if k not in FAST_MATH}
    return replace(spec, target=Target(config))


def llvm_cpu_name() -> str:
    """LLVM's name for this host's CPU (from its CPUID model, which a virtual machine may set)."""
    from tvm.target import codegen

    return codegen.llvm_get_system_cpu()


def _host_llvm() -> Target:
    """The host CPU, with its own instruction set (AVX2, F16C, ...) so LLVM can use it: LLVM's name for the CPU
    (from the CPUID model) plus what /proc/cpuinfo lists beyond it, minus what it implies but /proc/cpuinfo
    lacks. A virtual machine may report an older model (AMX, AVX-VNNI listed beyond it) or hide sets of the
    model it reports (an "emeraldrapids" without AMX, AVX-VNNI, AVX512-BF16/FP16): either way the library uses
    what this CPU runs, and loads here."""
    config = {"kind": "llvm", "mcpu": llvm_cpu_name(), **FAST_MATH}
    present = cpu_flags()
    if not present:  # no /proc/cpuinfo to go by: LLVM's name alone
        return Target(config)
    implied = set(x86_cpu_flags(Target(config)))
    changes = [
        f"{'+' if flag in present else '-'}{feature}"
        for feature, flag in X86_FEATURE_FLAGS.items()
        if (flag in present) != (flag in implied)
    ]
    return Target({**config, "mattr": changes} if changes else config)


def _gpu_host_llvm() -> Target:
    """Host code of a GPU library: the VM's glue around kernel launches, which needs no wide vectors. Built for any
    CPU of this architecture, since the GPU machine's processor is not this one."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return Target({"kind": "llvm", "mcpu": "x86-64-v2"})
    return Target({"kind": "llvm"})  # LLVM's generic CPU for this triple


def x86_cpu_flags(target: Target) -> list[str]:
    """The /proc/cpuinfo flags of the x86 instruction sets `target` lets LLVM use: the loader refuses the library
    on a CPU without one of them (it would die of an illegal instruction mid-run)."""
    from tvm.target import codegen

    return [flag for feature, flag in X86_FEATURE_FLAGS.items() if codegen.target_has_features(feature, target)]


def _x86_spec(target: Target, cpu: str) -> TargetSpec:
    return TargetSpec("llvm", target, "cpu", "model.so", extra={"cpu": cpu, "cpu_flags": x86_cpu_flags(target)})


def _llvm(request: TargetRequest) -> TargetSpec:
    if request.cpu == "host":
        if platform.machine().lower() in ("x86_64", "amd64"):
            return _x86_spec(_host_llvm(), "host")
        return TargetSpec("llvm", _host_llvm(), "cpu", "model.so", extra={"cpu": "host"})
    if request.cpu in X86_LEVELS:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise MlccError(f"--cpu {request.cpu} compiles for x86-64 and is supported on x86-64 machines only")
        # The level's instruction sets only: kernels take their generic paths where an ISA (AVX2) is missing.
        return _x86_spec(Target({"kind": "llvm", "mcpu": request.cpu, **FAST_MATH}), request.cpu)
    if request.cpu == "aarch64":
        if shutil.which(AARCH64_CROSS_CC) is None:
            raise MlccError(
                f"--cpu aarch64 needs the cross compiler {AARCH64_CROSS_CC} "
                "(Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu)"
            )
        # Generic ARMv8-A with NEON: runs on a Raspberry Pi 5, Android phones and Apple silicon under Linux.
        target = Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], **FAST_MATH})
        return TargetSpec("llvm", target, "cpu", "model.so", cross_compiler=AARCH64_CROSS_CC, extra={"cpu": "aarch64"})
    raise MlccError(f"unsupported --cpu {request.cpu!r}; supported: {', '.join(CPUS)}")


def _cuda(request: TargetRequest) -> TargetSpec:
    archs = tuple(sorted(set(request.cuda_archs or CUDA_ARCHS), key=lambda a: int(a[3:])))
    unknown = [a for a in archs if a not in CUDA_ARCHS]
    if unknown:
        raise MlccError(f"unsupported --cuda-arch {', '.join(unknown)}; supported: {', '.join(CUDA_ARCHS)}")
    if shutil.which("nvcc") is None:
        raise MlccError("--target cuda compiles kernels ahead of time and needs nvcc (the CUDA toolkit) on PATH")
    # The oldest architecture drives code generation, so the one source compiles for every listed arch.
    target = Target({"kind": "cuda", "arch": archs[0]}, host=_gpu_host_llvm())
    return TargetSpec("cuda", target, "cuda", "model.so", cuda_archs=archs)


def _metal(tag: str) -> TargetSpec:
    try:
        target = Target(tag)  # the tag carries its host: arm64 macOS
    except (ValueError, tvm.TVMError) as e:
        raise MlccError(f"unknown Apple GPU target {tag!r}: {str(e).splitlines()[0]}") from None
    if target.kind.name != "metal":
        raise MlccError(f"{tag!r} is not an Apple GPU (Metal) target")
    return TargetSpec("metal", target, "metal", "model.tar", extra={"tag": tag})


def _webgpu() -> TargetSpec:
    target = Target("webgpu", host={"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"})
    return TargetSpec("webgpu", target, "webgpu", "model.tar")


def _vulkan() -> TargetSpec:
    if tvm.get_global_func("target.build.vulkan", allow_missing=True) is None:
        raise MlccError(
            "--target vulkan needs a TVM built with Vulkan/SPIR-V code generation (target.build.vulkan, "
            "CMake USE_VULKAN=ON); this TVM has none (the PyPI apache-tvm wheel ships without it)"
        )
    return TargetSpec("vulkan", Target("vulkan", host=_gpu_host_llvm()), "vulkan", "model.so")


TARGETS = ("llvm", "cuda", "metal", "webgpu", "vulkan")


def resolve_target(request: TargetRequest | str) -> TargetSpec:
    if isinstance(request, str):
        request = TargetRequest(request)
    name = request.name
    if name != "llvm" and request.cpu != "host":
        raise MlccError("--cpu applies to --target llvm only")
    if name != "cuda" and request.cuda_archs:
        raise MlccError("--cuda-arch applies to --target cuda only")
    if name == "llvm":
        return _llvm(request)
    if name == "cuda":
        return _cuda(request)
    if name == "metal" or name.startswith("apple/"):
        return _metal(DEFAULT_METAL_TAG if name == "metal" else name)
    if name == "webgpu":
        return _webgpu()
    if name == "vulkan":
        return _vulkan()
    raise MlccError(f"unsupported target {name!r}; supported: {', '.join(TARGETS)} (or an Apple GPU tag: apple/m2-gpu)")
