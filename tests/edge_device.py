"""Runs on the emulated aarch64 device (tests/test_edge_aarch64.py copies it there, next to mlcc's runtime alone).

One process, so the slow emulated start-up (TVM's import, the model's load) is paid once: the `mlcc` entry
point (mlcc_cli.main) runs `run PACKAGE ...` as a user would, then the engine it made computes the logits of the
x86 build's token sequence, saved for the test to compare. The compiler side is not installed here, and importing it
is refused besides, so a run that needed it would fail.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import io
import json
import sys
import time

COMPILER_SIDE = {"compiler", "model_defs", "quant_schemes"}


class CompilerSideBlocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in COMPILER_SIDE:
            raise ImportError(f"{name} is compiler side, and the device has the runtime only")
        return None


def main() -> None:
    sys.meta_path.insert(0, CompilerSideBlocked())
    spec = json.loads(sys.argv[1])  # {"run_args": [...], "ids": [...], "logits": path.npy}
    started = time.monotonic()
    import mlcc_cli
    import runtime

    engines = []

    class RecordedEngine(runtime.Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

    runtime.Engine = RecordedEngine  # `mlcc run` imports it from runtime when it runs

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        try:
            mlcc_cli.main(["run", *spec["run_args"]], standalone_mode=False)
        except SystemExit as e:  # friendly_errors: the one-line error is on stderr
            raise SystemExit(f"mlcc run failed with exit status {e.code}") from None
    run_seconds = time.monotonic() - started

    import numpy as np

    np.save(spec["logits"], engines[0].prompt_logits(spec["ids"]))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in COMPILER_SIDE)
    print(json.dumps({"stdout": stdout.getvalue(), "run_seconds": run_seconds, "compiler_side_loaded": loaded}))


if __name__ == "__main__":
    main()
