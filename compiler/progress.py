"""Compile progress on the terminal: stages with their time, and TVM's known harmless warnings kept out of it."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

# Lines TVM's C++ side prints on every compile that tell a user nothing: the embedding lookup is legalized to
# topi's fast-mode `take`, whose indices the runtime checks before every call.
TVM_NOISE = ("Fast mode segfaults when there are out-of-bounds indices",)


class StageProgress:
    """A `progress` callback for `compile_model`: each message starts a stage, printed with the time since the
    start. On a terminal the running stage's line counts its seconds until the next message, so a long library
    build visibly moves; elsewhere (logs, CI) each stage is one plain line."""

    def __init__(self, stream: TextIO | None = None, tick_s: float = 0.5):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.tick_s = tick_s
        self.started = self.stage_started = time.monotonic()
        self.stage: str | None = None
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.ticker: threading.Thread | None = None

    def __enter__(self) -> StageProgress:
        if self.live:
            self.ticker = threading.Thread(target=self._tick, daemon=True)
            self.ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        if self.ticker:
            self.ticker.join()
        with self.lock:
            self._end_line()

    def __call__(self, message: str) -> None:
        with self.lock:
            self._end_line()
            self.stage, self.stage_started = message, time.monotonic()
            self._draw()

    def _draw(self, tick: bool = False) -> None:
        """The stage's line: when it began, what it is and, redrawn on a terminal, how long it has run so far."""
        line = f"[{self.stage_started - self.started:5.1f}s] {self.stage}"
        if not self.live:
            self.stream.write(line + "\n")
        elif not tick:
            self.stream.write(line)
        else:
            line += f" ... {time.monotonic() - self.stage_started:.0f}s"
            if len(line) >= shutil.get_terminal_size().columns:  # a wrapped line cannot be redrawn in place
                return
            self.stream.write(f"\r{line}\x1b[K")
        self.stream.flush()

    def _end_line(self) -> None:
        if self.live and self.stage is not None:
            self.stream.write("\n")
            self.stream.flush()
        self.stage = None

    def _tick(self) -> None:
        while not self.done.wait(self.tick_s):
            with self.lock:
                if self.stage is not None and time.monotonic() - self.stage_started >= 1:
                    self._draw(tick=True)


@contextmanager
def stderr_without(noise: tuple[str, ...] = TVM_NOISE) -> Iterator[None]:
    """Drop the lines containing any of `noise` from what this process (C++ code included) writes to file
    descriptor 2 while inside; everything else passes through unchanged."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    patterns = [n.encode() for n in noise]

    def pump() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not any(p in line for p in patterns):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump reads to the end and stops
        thread.join()
        os.close(saved)
