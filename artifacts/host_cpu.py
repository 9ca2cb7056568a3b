"""What this host's CPU offers a compiled library: its instruction-set flags, and the AMX tile state that
Linux hands a process only on request. Shared by the compiler (what `--cpu host` may use) and the runtime
(whether a library can run here)."""

from __future__ import annotations

import ctypes
import os
import platform

from artifacts.errors import MlccError

AMX_FLAGS = ("amx_tile", "amx_int8")
_SYS_ARCH_PRCTL = 158  # x86-64 Linux
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def cpu_flags() -> set[str]:
    """This CPU's instruction-set flags as Linux lists them (empty where /proc/cpuinfo is not there)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def enable_amx() -> None:
    """Ask Linux for AMX's tile registers for this process (every thread): without it the first tile
    instruction is an illegal instruction. Asking again is harmless."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        raise MlccError("AMX tiles are supported on x86-64 Linux only")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        reason = os.strerror(ctypes.get_errno())
        raise MlccError(f"this Linux kernel does not let the process use AMX tiles ({reason}); it needs 5.16 or newer")
