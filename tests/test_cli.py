"""The command line: output contract, determinism, and one-line errors on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def mlcc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlcc_cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_run_prompt_prints_only_the_answer(artifact, engine):
    art = artifact("llama-q4")
    proc = mlcc("run", str(art), "--raw", "--prompt", "Once upon a time", "--max-tokens", "12", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    expected = engine("llama-q4").generate("Once upon a time", SamplingParams(max_tokens=12, temperature=0))
    assert proc.stdout == expected[0].text + "\n"


def test_run_chat_uses_the_template(artifact, engine, hf_folder):
    from transformers import PreTrainedTokenizerFast

    proc = mlcc("run", str(artifact("llama-q4")), "--prompt", "Hello", "--max-tokens", "8", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    eng = engine("llama-q4")
    ids = eng.tokenizer.encode_chat([{"role": "user", "content": "Hello"}])
    reference = PreTrainedTokenizerFast.from_pretrained(hf_folder("llama-q4"))
    text = reference.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s><|user|>\nHello<|end|>\n<|assistant|>\n"
    assert ids == reference(text, add_special_tokens=False).input_ids
    expected = eng.generate_ids([ids], SamplingParams(max_tokens=8, temperature=0))[0].text
    assert proc.stdout == expected + "\n"


def test_compile_cli_reads_arch_from_config(hf_folder, tmp_path):
    out = tmp_path / "art"
    proc = mlcc("compile", "--model", str(hf_folder("qwen2-f32")), "--quant", "q0f32", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "mlcc-manifest.json").read_text())
    assert manifest["arch"] == "qwen2" and manifest["quant"]["name"] == "q0f32"
    assert set(manifest["files"]) >= {"model.so", "tokenizer.json", "weights-00000.safetensors"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_model_folder(tmp_path):
    proc = mlcc("compile", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "model not found")
    assert not (tmp_path / "out").exists()


def test_unsupported_arch(hf_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(hf_folder("llama-f32"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(
        mlcc("compile", "--model", str(folder), "-o", str(tmp_path / "o")), "unsupported architecture", "llama"
    )
    assert_one_line_error(
        mlcc("compile", "--model", str(folder), "--arch", "rwkv", "-o", str(tmp_path / "o")),
        "unsupported architecture 'rwkv'",
        "mistral",
    )


def test_unknown_quant_lists_known(hf_folder, tmp_path):
    proc = mlcc("compile", "--model", str(hf_folder("llama-f32")), "--quant", "q7x", "-o", str(tmp_path / "o"))
    assert_one_line_error(proc, "unknown quantization 'q7x'", "q4")


def test_truncated_safetensors_leaves_no_artifact(hf_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(hf_folder("llama-f32"), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    assert_one_line_error(mlcc("compile", "--model", str(folder), "-o", str(out)), "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no output, no staging folder


def copy_with_corrupted_shard(artifact_dir: Path, into: Path) -> Path:
    """A copy of an artifact whose first weight shard has its last byte flipped."""
    shutil.copytree(artifact_dir, into)
    shard = into / "weights-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    return into


def test_corrupted_artifact_file(artifact, tmp_path):
    art = copy_with_corrupted_shard(artifact("llama-q4"), tmp_path / "art")
    assert_one_line_error(mlcc("run", str(art), "--prompt", "hi"), "checksum mismatch")
    (art / "model.so").unlink()
    assert_one_line_error(mlcc("run", str(art), "--prompt", "hi"), "missing", "model.so")


def test_newer_artifact_format(artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(artifact("llama-q4"), art)
    manifest = json.loads((art / "mlcc-manifest.json").read_text())
    manifest["format_version"] = 99
    (art / "mlcc-manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(mlcc("run", str(art), "--prompt", "hi"), "newer")


def test_not_an_artifact(tmp_path):
    assert_one_line_error(mlcc("run", str(tmp_path / "missing"), "--prompt", "hi"), "not found")
    assert_one_line_error(mlcc("run", str(tmp_path), "--prompt", "hi"), "not an mlcc artifact")


def test_prompt_over_context_window(artifact):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 40
    proc = mlcc("run", str(artifact("llama-q4")), "--raw", "--prompt", long_prompt)
    assert_one_line_error(proc, "context window is 128")


def test_interactive_chat_streams_and_exits(artifact):
    proc = subprocess.run(
        [sys.executable, "-m", "mlcc_cli", "run", str(artifact("llama-q4")), "--max-tokens", "5", "--seed", "1"],
        input="Hello\nHow are you?\n/exit\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(">>> ") == 3


@pytest.mark.parametrize("seed", [3])
def test_same_seed_same_text(artifact, seed):
    args = [
        "run",
        str(artifact("llama-q4")),
        "--raw",
        "--prompt",
        "Hello",
        "--max-tokens",
        "16",
        "--temperature",
        "1.0",
        "--seed",
        str(seed),
    ]
    first, second = mlcc(*args), mlcc(*args)
    assert first.returncode == 0 and first.stdout == second.stdout
    other = mlcc(*args[:-1], str(seed + 1))
    assert other.stdout != first.stdout


def test_bench_prints_speeds(artifact):
    proc = mlcc("bench", str(artifact("llama-q4")), "--runs", "1", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    assert [r[1:3] for r in rows] == [["decode", "128"]]  # the tiny model's 128-token context fits no prefill test
    assert all(float(r[3]) > 0 for r in rows)


def test_compile_help_names_every_scheme():
    from quant_schemes import SCHEMES

    help_text = " ".join(mlcc("compile", "--help").stdout.split())
    assert all(name in help_text for name in [*SCHEMES, "gguf"])
