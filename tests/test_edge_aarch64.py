"""Edge proof: artifacts compiled here with --cpu aarch64 and packed with `mlcc package` run on an emulated aarch64
Linux and give the tokens of the x86 build of the same scheme.

The device (scripts/setup_aarch64.sh, run by .ci/run): Debian's qemu-user running an arm64 Debian Python with
the aarch64 wheels of pyproject.toml's dependencies. mlcc's runtime alone is copied there (runtime/, artifacts/,
mlcc_cli.py); tests/edge_device.py runs `mlcc run PACKAGE --raw --prompt ... --temperature 0` through the `mlcc`
entry point, then the logits of the x86 build's greedy sequence. Both builds use float activations, so they
differ only in rounding (NEON against AVX vector widths under fast-math): the texts must be equal, or part
only where the device's top two logits are a near-tie. Emulation is slow (minutes for SmolLM2): the prompt
and the continuation are short.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tomllib
from test_cli import ROOT, mlcc
from test_real_models import smollm_gguf

from compiler.compile import compile_model
from compiler.targets import AARCH64_CROSS_CC, TargetRequest

DEVICE = Path(
    os.environ.get("MLCC_AARCH64_DEVICE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlcc-aarch64-device"
)
RUNTIME_SIDE = ("runtime", "artifacts", "mlcc_cli.py")
PROMPT = "The capital of France is"
NEW_TOKENS = 8
NEAR_TIE = 0.5  # logits apart, at most, where rounding may tip a greedy choice


@pytest.fixture(scope="module")
def device(tmp_path_factory) -> Path:
    """A folder holding mlcc's runtime alone, for the emulated device's Python to run in."""
    if shutil.which(AARCH64_CROSS_CC) is None:
        pytest.skip(f"needs {AARCH64_CROSS_CC} to compile for aarch64 (scripts/setup.sh installs it where it can)")
    if not (DEVICE / "bin" / "python3").is_file():
        why = DEVICE / "unavailable"
        reason = why.read_text().strip() if why.is_file() else "scripts/setup_aarch64.sh has not been run"
        pytest.skip(f"no emulated aarch64 device in {DEVICE}: {reason}")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    installed = (DEVICE / "site" / ".mlcc-dependencies").read_text().split(": ", 1)[-1].split()
    if installed != dependencies:
        pytest.fail("the aarch64 device's wheels predate pyproject.toml's dependencies: rerun scripts/setup_aarch64.sh")
    app = tmp_path_factory.mktemp("aarch64-device")
    for name in RUNTIME_SIDE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, app / name)
    shutil.copy(Path(__file__).parent / "edge_device.py", app)
    assert not any((app / side).exists() for side in ("compiler", "model_defs", "quant_schemes"))
    return app


def package_for_aarch64(model: str, quant: str, tmp_path: Path) -> Path:
    out = tmp_path / f"aarch64-{quant}"
    compile_model(model, out, quant=quant, target=TargetRequest("llvm", cpu="aarch64"), progress=lambda _: None)
    assert json.loads((out / "mlcc-manifest.json").read_text())["target"]["cpu"] == "aarch64"
    package = tmp_path / f"aarch64-{quant}.mlcc"
    proc = mlcc("package", str(out), "-o", str(package))
    assert proc.returncode == 0, proc.stderr
    return package


def assert_same_tokens_on_device(device: Path, package: Path, x86_artifact: Path, tmp_path: Path) -> None:
    """The device's `mlcc run` text equals the x86 build's; the logits over the x86 build's greedy sequence
    are reported, and any parting must be at a near-tie of the device's own logits."""
    from runtime import Engine, SamplingParams

    run_args = ["--raw", "--prompt", PROMPT, "--max-tokens", str(NEW_TOKENS), "--temperature", "0"]
    x86_text = mlcc("run", str(x86_artifact), *run_args)
    assert x86_text.returncode == 0, x86_text.stderr
    x86 = Engine(x86_artifact)
    prompt_ids = x86.tokenizer.encode(PROMPT)
    greedy = x86.generate_ids([prompt_ids], SamplingParams(temperature=0, max_tokens=NEW_TOKENS))[0].token_ids
    ids = prompt_ids + greedy
    x86_logits = x86.prompt_logits(ids)

    spec = {"run_args": [str(package), *run_args], "ids": ids, "logits": str(tmp_path / "device-logits.npy")}
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MLCC_CACHE": str(tmp_path / "device-cache")}
    started = time.monotonic()
    proc = subprocess.run(
        [str(DEVICE / "bin" / "python3"), "edge_device.py", json.dumps(spec)],
        cwd=device,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["compiler_side_loaded"] == []
    device_logits = np.load(spec["logits"])

    generated = slice(len(prompt_ids) - 1, len(ids) - 1)  # the positions that chose the continuation
    difference = float(np.abs(device_logits[generated] - x86_logits[generated]).max())
    print(
        f"aarch64 {package.name}: {seconds:.0f} s emulated ({result['run_seconds']:.0f} s of them `mlcc run`), "
        f"max |logits - x86 logits| {difference:.2e}, text {result['stdout']!r}"
    )
    if result["stdout"] == x86_text.stdout:
        return
    parted = [i for i in range(generated.start, generated.stop) if device_logits[i].argmax() != ids[i + 1]]
    assert parted, f"texts differ, yet the logits choose the same tokens: {result['stdout']!r}, {x86_text.stdout!r}"
    row = device_logits[parted[0]]
    gap = float(row.max() - row[ids[parted[0] + 1]])
    assert gap < NEAR_TIE, f"the aarch64 build parted from the x86 build's tokens on a clear choice (gap {gap:.3f})"


def test_tiny_model_runs_on_aarch64_with_the_x86_tokens(device, hf_folder, artifact, tmp_path):
    package = package_for_aarch64(str(hf_folder("llama-q4")), "q4", tmp_path)
    assert_same_tokens_on_device(device, package, artifact("llama-q4"), tmp_path)


@pytest.mark.real_model
@pytest.mark.parametrize(("quant", "x86_quant"), [("q4", "q4"), ("gguf", "gguf-f32")])
def test_smollm2_runs_on_aarch64_with_the_x86_tokens(device, tmp_path, quant, x86_quant):
    """The GGUF build takes float activations on aarch64 (8-bit ones are AVX2 kernels), as gguf-f32 does here."""
    gguf = str(smollm_gguf())
    package = package_for_aarch64(gguf, quant, tmp_path)
    x86_artifact = tmp_path / f"x86-{x86_quant}"
    compile_model(gguf, x86_artifact, quant=x86_quant, progress=lambda _: None)
    for artifact in (tmp_path / f"aarch64-{quant}", x86_artifact):
        assert json.loads((artifact / "mlcc-manifest.json").read_text())["quant"].get("activations", "f32") == "f32"
    assert_same_tokens_on_device(device, package, x86_artifact, tmp_path)
