"""Device targets (compiled here, run elsewhere), the build child process, and one-file packages."""

from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import tvm
from test_cli import assert_one_line_error, copy_with_corrupted_shard, mlcc
from tvm.target import codegen

from artifacts.errors import MlccError
from compiler.compile import compile_model
from compiler.cuda_aot import fatbin_architectures
from compiler.targets import AARCH64_CROSS_CC, TargetRequest, resolve_target, x86_cpu_flags
from runtime import artifact as runtime_artifact
from runtime.artifact import LoadedArtifact
from tir_kernels.simd import AskAhead, asks_ahead, has_amx, has_avx2, has_vnni, vector_registers

MACH_O_ARM64 = b"\xcf\xfa\xed\xfe\x0c\x00\x00\x01"
WASM = b"\x00asm"


def compile_for(hf_folder, out: Path, request: TargetRequest) -> dict:
    compile_model(str(hf_folder("llama-q4")), out, quant="q4", target=request, progress=lambda _: None)
    return json.loads((out / "mlcc-manifest.json").read_text())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_library_carries_machine_code_for_each_arch_and_no_source(hf_folder, tmp_path):
    manifest = compile_for(hf_folder, tmp_path / "art", TargetRequest("cuda", ("sm_90", "sm_80")))
    assert manifest["target"]["device"] == "cuda" and manifest["target"]["cuda_archs"] == ["sm_80", "sm_90"]
    library = (tmp_path / "art" / "model.so").read_bytes()
    assert fatbin_architectures(library) == ["sm_80", "sm_90"]
    assert b"\x06\x00\x00\x00\x00\x00\x00\x00fatbin" in library  # the CUDA module's format: no compile at load
    assert b"__global__" not in library and b"#include <cuda" not in library  # no CUDA source left
    # The host code runs on the GPU machine's CPU, not this one's: no instruction set beyond x86-64-v2.
    host = tvm.target.Target(json.loads(manifest["target"]["host"]))
    assert not set(x86_cpu_flags(host)) & {"avx", "avx2", "fma", "avx512f"}
    if not tvm.cuda(0).exist:
        with pytest.raises(MlccError, match="needs a cuda device"):
            LoadedArtifact(tmp_path / "art")


@pytest.mark.parametrize(
    "target, object_magic, kernel_marker",
    [("metal", MACH_O_ARM64, b"kernel void"), ("webgpu", WASM, b"@compute")],
)
def test_metal_and_webgpu_export_objects_and_kernel_source(hf_folder, tmp_path, target, object_magic, kernel_marker):
    manifest = compile_for(hf_folder, tmp_path / "art", TargetRequest(target))
    assert manifest["library"] == "model.tar" and manifest["target"]["device"] == target
    with tarfile.open(tmp_path / "art" / "model.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert sorted(members) == ["devc.o", "lib0.o"]  # host code, and the packed device modules
    assert all(data.startswith(object_magic) for data in members.values())
    assert kernel_marker in members["devc.o"]
    with pytest.raises(MlccError, match="unlinked"):
        LoadedArtifact(tmp_path / "art")


@pytest.mark.skipif(
    tvm.get_global_func("target.build.vulkan", allow_missing=True) is not None, reason="this TVM has Vulkan"
)
def test_vulkan_without_spirv_codegen_is_a_one_line_error(hf_folder, tmp_path):
    proc = mlcc("compile", "--model", str(hf_folder("llama-q4")), "--target", "vulkan", "-o", str(tmp_path / "o"))
    assert_one_line_error(proc, "vulkan", "target.build.vulkan")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(shutil.which(AARCH64_CROSS_CC) is None, reason=f"needs {AARCH64_CROSS_CC}")
def test_aarch64_cross_compile(hf_folder, tmp_path):
    manifest = compile_for(hf_folder, tmp_path / "art", TargetRequest("llvm", cpu="aarch64"))
    assert manifest["target"]["cpu"] == "aarch64"
    header = subprocess.run(["readelf", "-h", str(tmp_path / "art" / "model.so")], capture_output=True, text=True)
    assert "AArch64" in header.stdout and "DYN" in header.stdout
    if os.uname().machine != "aarch64":
        with pytest.raises(MlccError, match="machine code for aarch64"):
            LoadedArtifact(tmp_path / "art")


X86_HOST = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="needs an x86-64 host")
RUN_ARGS = ("--raw", "--prompt", "Once upon a time", "--max-tokens", "8", "--temperature", "0")


@X86_HOST
def test_x86_64_v2_artifact_takes_the_generic_path(hf_folder, artifact, tmp_path):
    """Built for any x86-64 CPU (SSE4.2, no AVX): it runs here and gives the host build's text. GGUF builds for
    it take float activations, since the 8-bit activation kernels are AVX2 ones."""
    manifest = compile_for(hf_folder, tmp_path / "art", TargetRequest("llvm", cpu="x86-64-v2"))
    assert manifest["target"]["cpu"] == "x86-64-v2" and manifest["target"]["cpu_flags"] == ["sse4_2", "popcnt"]
    assert not has_avx2(resolve_target(TargetRequest("llvm", cpu="x86-64-v2")).target)
    generic = mlcc("run", str(tmp_path / "art"), *RUN_ARGS)
    assert generic.returncode == 0, generic.stderr
    assert generic.stdout == mlcc("run", str(artifact("llama-q4")), *RUN_ARGS).stdout


@X86_HOST
def test_avx512_artifact_is_refused_in_one_line_on_a_cpu_without_it(hf_folder, artifact, tmp_path, monkeypatch):
    manifest = compile_for(hf_folder, tmp_path / "art", TargetRequest("llvm", cpu="x86-64-v4"))
    assert {"avx2", "avx512f", "avx512bw", "avx512vl"} <= set(manifest["target"]["cpu_flags"])
    proc = mlcc("run", str(tmp_path / "art"), *RUN_ARGS)
    if "avx512f" in runtime_artifact._host_cpu_flags():  # runs here; refused on a CPU like this one minus AVX-512
        assert proc.returncode == 0 and proc.stdout == mlcc("run", str(artifact("llama-q4")), *RUN_ARGS).stdout
        without = {flag for flag in runtime_artifact._host_cpu_flags() if not flag.startswith("avx512")}
        monkeypatch.setattr(runtime_artifact, "_host_cpu_flags", lambda: without)
        refusal = r"needs avx512f, avx512bw.* \(compiled with --cpu x86-64-v4\), which this CPU lacks"
        with pytest.raises(MlccError, match=refusal) as e:
            LoadedArtifact(tmp_path / "art")
        assert "\n" not in str(e.value)
    else:
        assert_one_line_error(proc, "needs", "avx512f", "this CPU lacks", "--cpu x86-64-v2")


@X86_HOST
def test_host_target_takes_what_cpuinfo_lists_not_llvms_cpu_name(monkeypatch):
    """A virtual machine may report an older CPU model than its flags: --cpu host still gets AMX and AVX-VNNI
    where /proc/cpuinfo lists them, and the artifact then needs them (and asks Linux for the tiles at load). It
    may also hide sets of the model it reports: those stay out, or the library would not load where it was
    compiled."""
    from compiler import targets

    monkeypatch.setattr(targets, "llvm_cpu_name", lambda: "skylake-avx512")  # AVX-512, no VNNI, no AMX
    listed = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8"}
    monkeypatch.setattr(targets, "cpu_flags", lambda: listed)
    spec = resolve_target(TargetRequest("llvm", cpu="host"))
    assert {"+avx512vnni", "+avxvnni", "+amx-tile", "+amx-int8"} <= set(spec.target.attrs["mattr"])
    assert {"avx512_vnni", "amx_tile", "amx_int8"} <= set(spec.extra["cpu_flags"])
    monkeypatch.setattr(targets, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert "amx_tile" not in resolve_target(TargetRequest("llvm", cpu="host")).extra["cpu_flags"]

    # A model named with more than the VM hands out (CPUID says Emerald Rapids; no AMX, AVX-VNNI, BF16, FP16).
    monkeypatch.setattr(targets, "llvm_cpu_name", lambda: "emeraldrapids")
    listed = {
        *("sse4_2", "popcnt", "avx", "avx2", "fma", "f16c"),
        *("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"),
    }
    monkeypatch.setattr(targets, "cpu_flags", lambda: listed)
    spec = resolve_target(TargetRequest("llvm", cpu="host"))
    assert set(spec.extra["cpu_flags"]) <= listed and "avx512_vnni" in spec.extra["cpu_flags"]
    assert not has_amx(spec.target) and has_vnni(spec.target) and vector_registers(spec.target) == 32
    for feature in ("amx-tile", "amx-int8", "amx-bf16", "avxvnni", "avx512bf16", "avx512fp16"):
        assert not codegen.target_has_features(feature, spec.target), feature

    asked = []
    monkeypatch.setattr(runtime_artifact, "enable_amx", lambda: asked.append(True))
    elf = Path(sys.executable).resolve()
    runtime_artifact._check_library_loadable(elf, {"cpu_flags": ["avx2"]})
    assert not asked
    if {"amx_tile", "amx_int8"} <= runtime_artifact._host_cpu_flags():
        runtime_artifact._check_library_loadable(elf, {"cpu_flags": ["avx2", "amx_tile", "amx_int8"]})
        assert asked


@pytest.mark.parametrize(
    ("cpu", "expected"),
    [
        ("rocketlake", AskAhead.PAIRS),
        ("sapphirerapids", AskAhead.PAIRS),
        ("znver5", AskAhead.ONE_GROUP),
        ("znver4", AskAhead.NONE),
        ("znver3", AskAhead.NONE),
        ("x86-64-v3", AskAhead.NONE),
    ],
)
def test_decode_asks_ahead_as_measured_per_cpu(cpu: str, expected: AskAhead):
    """Asking ahead for one stream of weights: +13% Q4_K decode on an Intel Xeon (two row groups side by side),
    -25% on AMD Zen 4, +10% on Zen 5 (one group at a time); an x86-64 level runs on any of them."""
    assert asks_ahead(tvm.target.Target({"kind": "llvm", "mcpu": cpu})) is expected


def test_compiler_crash_in_child_is_a_one_line_error(hf_folder, tmp_path):
    env = {**os.environ, "MLCC_TEST_CRASH_IN_BUILD": "1"}
    args = ["compile", "--model", str(hf_folder("llama-q4")), "-o", str(tmp_path / "out")]
    proc = subprocess.run(
        [sys.executable, "-m", "mlcc_cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert_one_line_error(proc, "TVM compiler crashed", "SIGSEGV")
    assert not list(tmp_path.iterdir())  # no artifact, no staging folder


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_package_round_trip(artifact, tmp_path, monkeypatch, compression):
    if compression == "zstd":
        pytest.importorskip("zstandard")
    monkeypatch.setenv("MLCC_CACHE", str(tmp_path / "cache"))
    package = tmp_path / "model.mlcc"
    proc = mlcc("package", str(artifact("llama-q4")), "-o", str(package), "--compression", compression)
    assert proc.returncode == 0, proc.stderr
    with open(package, "rb") as f:
        assert f.read(4).startswith(b"\x28\xb5\x2f\xfd" if compression == "zstd" else b"\x1f\x8b")

    args = ["--raw", "--prompt", "Once upon a time", "--max-tokens", "8", "--temperature", "0"]
    from_folder = mlcc("run", str(artifact("llama-q4")), *args)
    from_package = mlcc("run", str(package), *args)
    assert from_package.returncode == 0, from_package.stderr
    assert from_package.stdout == from_folder.stdout
    unpacked = list((tmp_path / "cache" / "packages").iterdir())
    assert len(unpacked) == 1  # unpacked once, named after the package's sha256
    assert mlcc("run", str(package), *args).stdout == from_folder.stdout
    assert list((tmp_path / "cache" / "packages").iterdir()) == unpacked

    info = mlcc("inspect", str(package))
    assert info.returncode == 0, info.stderr
    for fragment in ("arch:", "llama", "quant:", "q4", "target:", "llvm", "versions:", "tvm", "checksums:", "valid"):
        assert fragment in info.stdout


def test_corrupted_or_truncated_package_is_a_one_line_error(artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("MLCC_CACHE", str(tmp_path / "cache"))
    package = tmp_path / "model.mlcc"
    assert mlcc("package", str(artifact("llama-q4")), "-o", str(package), "--compression", "none").returncode == 0
    data = package.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        shard = tar.getmember("weights-00000.safetensors")
    flipped = bytearray(data)
    flipped[shard.offset_data + 100] ^= 0xFF  # a weight byte: the tar still reads, the sha256 does not match
    (tmp_path / "flipped.mlcc").write_bytes(bytes(flipped))
    (tmp_path / "short.mlcc").write_bytes(data[: len(data) // 2])
    for name, fragment in [("flipped.mlcc", "checksum mismatch"), ("short.mlcc", "corrupted package")]:
        assert_one_line_error(mlcc("run", str(tmp_path / name), "--prompt", "hi"), "corrupted package", fragment)
        assert_one_line_error(mlcc("inspect", str(tmp_path / name)), "corrupted package")
    assert not [p for p in (tmp_path / "cache" / "packages").iterdir()]  # nothing half-unpacked is kept


def test_inspect_reports_invalid_checksums(artifact, tmp_path):
    art = copy_with_corrupted_shard(artifact("llama-q4"), tmp_path / "art")
    proc = mlcc("inspect", str(art))
    assert proc.returncode == 1 and "checksums:" in proc.stdout and "INVALID" in proc.stdout


def test_every_cpu_kernel_keeps_noalias_whatever_sorts_last():
    """TVM's LLVM codegen emits every function with the noalias flag of the last one it declares; the CPU
    pipeline's last pass marks all kernels, so a noalias kernel keeps `noalias` pointers next to one that
    sorts after it without the flag (as TVM's tree_attn_paged_kv_cpu does in every model library)."""
    from tvm.script import tirx as T

    from compiler.build import _uniform_noalias

    @T.prim_func(s_tir=True)
    def a_kernel(x: T.Buffer((16,), "float32"), y: T.Buffer((16,), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i in range(16):
            y[i] = x[i] * T.float32(2)

    @T.prim_func(s_tir=True)
    def z_last(x: T.Buffer((16,), "float32"), y: T.Buffer((16,), "float32")):
        for i in range(16):
            y[i] = x[i] + T.float32(1)

    def signature(mod: tvm.IRModule) -> str:
        ir = tvm.tirx.build(mod, target="llvm").inspect_source("ll")
        return next(line for line in ir.splitlines() if line.startswith("define") and "@__tvm_ffi_a_kernel(" in line)

    mod = tvm.IRModule({"a_kernel": a_kernel, "z_last": z_last})
    assert "noalias" not in signature(mod)  # TVM's behaviour that the pass works around
    assert "noalias" in signature(tvm.IRModule({"a_kernel": a_kernel}))
    assert "noalias" in signature(_uniform_noalias(mod))


def _workspace_sizes(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> list[int]:
    """Constant byte sizes of the TVMBackendAllocWorkspace calls in func's compiled LLVM IR."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    ir = tvm.tirx.build(mod, target=target).inspect_source("ll")
    return [int(size) for size in re.findall(r"call ptr %\w+\(i32 1, i32 %dev_id, i64 (\d+),", ir)]


def test_kernel_scratch_lives_on_the_stack():
    """TVM serves a "local" buffer on the CPU from its workspace pool: a call per parallel task, and a pointer
    LLVM cannot keep in registers, so every accumulator update went through memory. A default-scope buffer
    under 1 KiB is a stack array instead; the kernels' per-task scratch is one."""
    from gguf import GGMLQuantizationType as Q
    from tvm.script import tirx as T

    from compiler.targets import TargetRequest, resolve_target
    from tir_kernels.matmul_llamacpp import llamacpp_matmul
    from tir_kernels.simd import has_avx2

    def doubled(scope: str) -> tvm.tirx.PrimFunc:
        @T.prim_func(s_tir=True)
        def func(x: T.Buffer((64, 8), "float32"), y: T.Buffer((64, 8), "float32")):
            for task in T.parallel(64):
                scratch = T.alloc_buffer((8,), "float32", scope=scope)
                for i in range(8):
                    scratch[i] = x[task, i] * T.float32(2)
                for i in range(8):
                    y[task, i] = scratch[i]

        return func

    assert _workspace_sizes(doubled("local"), "llvm") == [32]  # TVM's behaviour that the kernels avoid
    assert _workspace_sizes(doubled("global"), "llvm") == []
    target = resolve_target(TargetRequest()).target
    if not has_avx2(target):
        pytest.skip("the llama.cpp-order kernels are built for AVX2 CPUs")
    for qtype in (Q.Q4_1, Q.Q5_0, Q.Q4_K, Q.Q6_K):
        assert all(size >= 1024 for size in _workspace_sizes(llamacpp_matmul(qtype, 512, 13, True), target))


def test_gpu_run_carries_weights_as_templates_that_fill_rebuilds(artifact, tmp_path):
    """bench/gpu_run.py's transfer to a GPU machine: `template` keeps each distinct tensor once (a tied output
    head is the embedding again), `fill` writes the same shards back; with --rows, one tensor's first rows per
    shape, tiled to full size."""
    source = artifact("llama-q4")
    shard = json.loads((source / "mlcc-manifest.json").read_text())["weights"]["shards"][0]
    script = [sys.executable, str(Path(__file__).resolve().parent.parent / "bench" / "gpu_run.py")]
    for rows in ([], ["--rows", "2"]):
        copy = tmp_path / f"copy{len(rows)}"
        shutil.copytree(source, copy)
        subprocess.run([*script, "template", str(source), str(tmp_path / "t.npz"), *rows], check=True)
        (copy / shard).write_bytes(b"")
        subprocess.run([*script, "fill", str(copy), str(tmp_path / "t.npz")], check=True)
        LoadedArtifact(copy)  # sizes and checksums as the manifest lists them
        same = (copy / shard).read_bytes() == (source / shard).read_bytes()
        assert same == (not rows)
