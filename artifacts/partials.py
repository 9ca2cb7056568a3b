"""Folders a writer fills before renaming them into place (`.NAME.partial-PID`), and removing the ones a
killed writer left behind: a folder whose owning process is gone is stale."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

PARTIAL = re.compile(r"\.(.+)\.(partial|old)-(\d{1,9})")


def partial_path(final: Path, kind: str = "partial") -> Path:
    """The temporary sibling of `final` this process writes (kind "partial") or moves an old copy to ("old")."""
    return final.parent / f".{final.name}.{kind}-{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether a process with this id is running (a zombie, dead but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc here: the process exists
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the partial and old folders in `folder` whose owning process has died; returns them."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    stale = []
    for entry in entries:
        match = PARTIAL.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not process_alive(int(match[3])):
            shutil.rmtree(entry, ignore_errors=True)
            stale.append(entry)
    return stale
