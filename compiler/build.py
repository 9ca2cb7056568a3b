"""nn model -> Relax IRModule -> device library, per target; run in a child process.

TVM's compiler can crash hard (a segfault in a schedule rule). The build runs in a child process started
from a forkserver that has TVM imported already, so a crash becomes a one-line error in the parent and a
later compile in the same process does not pay for importing TVM again.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import tvm
from tvm import relax, tirx
from tvm.s_tir import dlight as dl

from artifacts.errors import MlccError
from artifacts.partials import process_alive
from compiler.cpu_attention import cpu_attention
from compiler.cpu_schedule import cpu_schedule, fast_gelu
from compiler.cuda_aot import fatbin_packer
from compiler.entry_points import PARAM_PREFIX, EntryPoints
from compiler.lora_slots import add_lora_slots, block_linears
from compiler.numerics import numerics_target, use_numerics
from compiler.progress import TVM_NOISE, stderr_without
from compiler.targets import TargetRequest, TargetSpec, resolve_target
from compiler.vm_instructions import slim_vm_calls
from model_defs import get_arch
from quant_schemes import QuantScheme
from tir_kernels.numerics import Numerics
from tir_kernels.rope import RopeSpec

# Set by tests only: the build child kills itself with SIGSEGV, as a compiler crash would.
CRASH_FOR_TEST_ENV = "MLCC_TEST_CRASH_IN_BUILD"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _cpu_pipeline(
    target: tvm.target.Target, window_size: int | None, rope: RopeSpec | None, numerics: Numerics, softcap: float = 0.0
) -> tvm.transform.Pass:
    """TVM's CPU pipeline with mlcc's attention kernels and matmul schedule."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    passes = (
        # one RoPE table per base and call, not one per head group and layer (identical pure calls merged)
        [relax.transform.EliminateCommonSubexpr()]
        # TVM's CPU attention and RoPE kernels are serial, scalar
        + [cpu_attention(window_size, rope, numerics, softcap)]
        + [fast_gelu]  # libm's tanh is scalar
        + cpu_generic.library_dispatch_passes(target)
        # x @ permute_dims(W) as one kernel reading W's rows, not a transposed copy of W on every call.
        + [relax.transform.FuseTransposeMatmul()]
        # a kernel's [b*s, n] result reshaped to [b, s, n] and back for the next kernel: each reshape is three
        # VM instructions (shape, view, release) per layer and step
        + [relax.transform.RemoveRedundantReshape()]
        + cpu_generic.legalize_passes(target)
        + [cpu_schedule]
        + cpu_generic.dataflow_lower_passes(target)
        + cpu_generic.finalize_passes(target)
        # each shape built once per call, no releases of tensors: 3,119 -> 1,462 VM instructions per SmolLM2
        # decode step
        + [slim_vm_calls]
        + [_uniform_noalias]
    )
    return _with_target(target, passes, "MlccCPUPipeline")


@tvm.transform.module_pass(opt_level=0, name="MlccUniformNoAlias")
def _uniform_noalias(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Mark every kernel's pointer arguments as not aliasing one another.

    TVM's LLVM codegen reads a function's `tirx.noalias` when it declares the function, and it declares all
    of a library's functions before it emits any, so every kernel is emitted with the flag of the last one
    in symbol order: TVM's own `tree_attn_paged_kv_cpu`, which lacks it. LLVM then had to assume that each
    accumulator store might change the weights, and reloaded and re-decoded them for every token (Gemma 3's
    Q5_0 prefill matmul ran 1.4x slower in the library than compiled alone). No kernel here writes through
    one argument memory it reads through another (TVM's KV cache passes several read-only views of one
    buffer, which noalias allows), so the flag is set on all of them, and the codegen's choice no longer
    depends on which kernel sorts last.
    """
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc) and not func.attrs.get("tirx.noalias", False):
            mod[gv] = func.with_attr("tirx.noalias", True)
    return mod


@tvm.transform.module_pass(opt_level=0, name="MlccNoTensorize")
def _no_tensorize(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """dlight's tensor-core matmul path segfaults (in s_tir Tensorize) at real sizes: keep every kernel SIMT."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc):
            mod.update_func(gv, func.with_attr("dlight.do_not_tensorize", True))
    return mod


def _gpu_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's default GPU pipeline, with dlight's rules run on kernels marked do-not-tensorize.

    Metal leaves out dlight's Matmul rule: its Metal variant ignores the mark and segfaults; GEMV, Reduction
    and Fallback still schedule every kernel (the quantized matmuls included)."""
    backend = relax.backend.cuda.pipeline if target.kind.name == "cuda" else relax.backend.gpu_generic.pipeline
    rules = [dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    if target.kind.name != "metal":
        rules.insert(0, dl.gpu.Matmul())
    legalize = [p for p in backend.legalize_passes(target) if not isinstance(p, dl.ApplyDefaultSchedule)]
    passes = (
        backend.library_dispatch_passes(target)
        + legalize
        + [_no_tensorize, dl.ApplyDefaultSchedule(*rules)]
        + backend.dataflow_lower_passes(target)
        + backend.finalize_passes(target)
    )
    return _with_target(target, passes, "MlccGPUPipeline")


def _with_target(target: tvm.target.Target, passes: list[tvm.transform.Pass], name: str) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name=name)
    def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def build_library(
    mod: tvm.IRModule,
    spec: TargetSpec,
    out: Path,
    window_size: int | None = None,
    rope: RopeSpec | None = None,
    numerics: Numerics = Numerics.MLCC,
    softcap: float = 0.0,
) -> None:
    """Lower with the target's fusing pipeline and export the library to `out` (.so, or .tar of objects).

    window_size: the sliding window of the module's KV cache kernels, if they have one; softcap: the
    attention scores' soft cap (Gemma 2), which only mlcc's CPU kernels apply."""
    if spec.device == "cpu":
        pipeline = _cpu_pipeline(spec.target, window_size, rope, numerics, softcap)
    elif softcap:
        raise MlccError(f"attention soft-capping (Gemma 2) is implemented for CPU targets only, not {spec.name}")
    else:
        pipeline = _gpu_pipeline(spec.target)
    executable = tvm.compile(mod, target=spec.target, relax_pipeline=pipeline)
    if spec.cuda_archs:
        executable.export_library(str(out), fpack_imports=fatbin_packer(spec.cuda_archs))
    elif spec.cross_compiler:
        from tvm.support import cc

        executable.export_library(str(out), fcompile=cc.cross_compiler(spec.cross_compiler))
    else:
        executable.export_library(str(out))


@dataclass
class BuildJob:
    """Everything the child needs to rebuild the model and compile it; plain picklable data. `scheme` is
    prepared for the target already, and `numerics` is what compile decided."""

    arch: str
    config: Any
    scheme: QuantScheme
    target: TargetRequest
    library: Path
    numerics: Numerics = Numerics.MLCC
    lora_slots: tuple[int, int] = (0, 0)  # (slots, rank): adapter slots in the block linears; (0, 0) for none
    kv_dtype: str | None = None  # the KV cache's element type; None: the activations'


def export_and_build(job: BuildJob) -> list[str]:
    """Export the model's entry points and build the library; returns the parameter order."""
    spec = numerics_target(resolve_target(job.target), job.numerics)
    net = get_arch(job.arch).Model(job.config)
    linears = block_linears(net)
    job.scheme.quantize_model(net)
    use_numerics(net, job.numerics, spec, job.scheme.dtype)
    if job.lora_slots[0]:
        add_lora_slots(net, linears, *job.lora_slots, job.scheme.dtype)
    entry = EntryPoints(net, spec.target, job.scheme.dtype, job.numerics, job.kv_dtype)
    mod, named_params = entry.export_tvm(spec=entry.spec())
    softcap = entry.layout.attn_softcap
    build_library(mod, spec, job.library, entry.kv_window, entry.cache_rope, job.numerics, softcap)
    return [name.removeprefix(PARAM_PREFIX) for name, _ in named_params]


def _die_with(parent_pid: int) -> None:
    """End this build child when the compiling process ends, even by SIGKILL, so it stops writing into the
    staging folder. The child's parent is the forkserver, which exits once no process holds its "alive" pipe;
    every child gets a copy (multiprocessing's private `_forkserver_alive_fd`). Letting go of it here, the
    forkserver exits with the compiling process, and on Linux the kernel then kills this child
    (PR_SET_PDEATHSIG). Elsewhere, or where that pipe is not found, a thread polls the compiling process."""
    alive_fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        os.close(alive_fd)
        forkserver._forkserver._forkserver_alive_fd = None
    if alive_fd is not None and sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    else:
        threading.Thread(target=_poll_parent, args=(parent_pid,), daemon=True).start()
    if not process_alive(parent_pid):  # it died before the death signal was armed
        os._exit(1)


def _poll_parent(parent_pid: int) -> None:
    while process_alive(parent_pid):
        time.sleep(0.5)
    os._exit(1)


def _child_main(job: BuildJob, results: Connection, crash: bool, parent_pid: int) -> None:
    _die_with(parent_pid)
    if crash:
        os.kill(os.getpid(), signal.SIGSEGV)
    try:
        with nullcontext() if os.environ.get("MLCC_DEBUG") else stderr_without(TVM_NOISE):
            results.send(("ok", export_and_build(job)))
    except MlccError as e:
        results.send(("error", str(e)))
    except BaseException as e:  # TVM errors do not always pickle: send their first line
        if os.environ.get("MLCC_DEBUG"):
            traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        results.send(("error", f"building the library failed: {type(e).__name__}: {first}"))


_CONTEXT: multiprocessing.context.BaseContext | None = None


def _context() -> multiprocessing.context.BaseContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload([__name__])  # children start with TVM and the model code imported
    return _CONTEXT


def build_in_child_process(job: BuildJob) -> list[str]:
    """`export_and_build` in a child process; a crash there is a one-line MlccError here."""
    context = _context()
    receive, send = context.Pipe(duplex=False)
    crash = bool(os.environ.get(CRASH_FOR_TEST_ENV))
    child = context.Process(target=_child_main, args=(job, send, crash, os.getpid()))
    child.start()
    send.close()
    status, payload = "crashed", None
    try:
        status, payload = receive.recv()
    except EOFError:  # the child died without answering
        pass
    finally:
        receive.close()
        if status != "ok" and child.is_alive():  # interrupted here: do not leave the compiler running
            child.terminate()
        child.join()
    if status == "ok":
        return payload
    if status == "error":
        raise MlccError(payload)
    code = child.exitcode or 0
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    raise MlccError(f"the TVM compiler crashed ({how}) while building the library for {job.target.name}")
