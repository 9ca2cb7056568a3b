"""Artifacts and packages from untrusted hands, and compiles that are killed or fed mismatched weights.

Every file the runtime opens must be a listed, checksummed file inside the artifact; a package unpacks only
what its manifest lists; a config that disagrees with its weights fails before the build; a killed compile
leaves no build process running, and the next compile removes its staging folder.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from test_cli import ROOT, assert_one_line_error, mlcc

from artifacts import MANIFEST_NAME, MlccError, load_manifest, verify_files
from artifacts.manifest import sha256_of

# ---- item 8: the manifest names only checksummed files inside the artifact, with sane fields ----------


def edited_copy(folder: Path, tmp_path: Path, edit) -> Path:
    """A copy of an artifact whose manifest `edit(data, copy)` changed."""
    copy = tmp_path / "art"
    shutil.copytree(folder, copy)
    data = json.loads((copy / MANIFEST_NAME).read_text())
    edit(data, copy)
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    return copy


def _library_elsewhere(data, _copy):
    data["library"] = "/tmp/elsewhere/other.so"


def _library_unlisted(data, copy):
    shutil.copy(copy / data["library"], copy / "other.so")
    data["library"] = "other.so"


def _listed(name: str, real: Path):
    def edit(data, _copy):
        data["files"][name] = {"size": real.stat().st_size, "sha256": sha256_of(real)}

    return edit


def _set(*keys, value):
    def edit(data, _copy):
        node = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


def _shard_outside(data, _copy):
    data["weights"]["shards"].append("../weights.safetensors")


def _tokenizer_unlisted(data, _copy):
    del data["files"]["tokenizer.json"]
    data["tokenizer"]["files"].remove("tokenizer.json")


BAD_MANIFESTS = {
    "library-elsewhere": (_library_elsewhere, "library '/tmp/elsewhere/other.so' is not one of the artifact's"),
    "library-unlisted": (_library_unlisted, "library 'other.so' is not one of the artifact's checksummed files"),
    "file-parent": (_listed("../../etc/passwd", Path("/etc/passwd")), "'../../etc/passwd' is not a plain file name"),
    "file-absolute": (_listed("/etc/passwd", Path("/etc/passwd")), "'/etc/passwd' is not a plain file name"),
    "shard-outside": (_shard_outside, "weight shard '../weights.safetensors' is not one of"),
    "tokenizer-unlisted": (_tokenizer_unlisted, "tokenizer files lack tokenizer.json"),
    "page-size-0": (_set("kv_cache", "page_size", value=0), "kv_cache.page_size must be a positive integer, not 0"),
    "format-negative": (_set("format_version", value=-7), "format_version must be a positive integer, not -7"),
    "context-text": (_set("context_window", value="4096"), "context_window must be a positive integer"),
    "kv-heads-0": (_set("model_config", "num_kv_heads", value=0), "model_config.num_kv_heads must be a positive"),
    "kv-dtype": (_set("kv_cache", "dtype", value="int3"), "kv_cache.dtype must be one of"),
    "bad-sha256": (_set("files", "model.so", "sha256", value="abc"), "file 'model.so' has no valid sha256"),
    "negative-size": (_set("files", "model.so", "size", value=-1), "file 'model.so' has no valid size"),
    "alias-unknown": (
        _set("weights", "aliases", value={"output.weight": "nowhere"}),
        "weights.aliases must map parameters to stored parameters",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_is_one_line_error(artifact, tmp_path, case):
    edit, message = BAD_MANIFESTS[case]
    folder = edited_copy(artifact("llama-f32"), tmp_path, edit)
    with pytest.raises(MlccError, match=re.escape(message)) as raised:
        load_manifest(folder)
    assert "\n" not in str(raised.value)


def test_inspect_refuses_a_library_outside_the_artifact(artifact, tmp_path):
    folder = edited_copy(artifact("llama-f32"), tmp_path, _library_elsewhere)
    proc = mlcc("inspect", str(folder))
    assert_one_line_error(proc, "corrupted manifest", "/tmp/elsewhere/other.so")
    assert "checksums: valid" not in proc.stdout


def test_run_with_page_size_zero_is_an_error_not_sigfpe(artifact, tmp_path):
    folder = edited_copy(artifact("llama-f32"), tmp_path, _set("kv_cache", "page_size", value=0))
    proc = mlcc("run", str(folder), "--raw", "--prompt", "Once", "--max-tokens", "2")
    assert_one_line_error(proc, "kv_cache.page_size")


def test_symlinked_artifact_file_is_refused(artifact, tmp_path):
    folder = edited_copy(artifact("llama-f32"), tmp_path, lambda data, copy: None)
    outside = tmp_path / "outside.json"
    shutil.copy(folder / "tokenizer.json", outside)  # same bytes: only the link itself is wrong
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(outside)
    with pytest.raises(MlccError, match="symbolic link"):
        verify_files(folder, load_manifest(folder), check_hashes=False)


def test_library_is_hashed_even_without_weight_checks(artifact, tmp_path):
    folder = edited_copy(artifact("llama-f32"), tmp_path, lambda data, copy: None)
    library = folder / load_manifest(folder).library
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different code
    library.write_bytes(bytes(data))
    with pytest.raises(MlccError, match="checksum mismatch"):
        verify_files(folder, load_manifest(folder), check_hashes=False)


# ---- item 9: a package unpacks only its listed files, within their sizes; a full disk says so ----------


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MLCC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "packages"


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def artifact_members(folder: Path) -> list[tuple[str, bytes]]:
    names = [MANIFEST_NAME, *load_manifest(folder).files]
    return [(name, (folder / name).read_bytes()) for name in names]


def test_package_with_unlisted_member_is_refused(artifact, tmp_path, cache):
    from artifacts.package import unpack_package

    members = artifact_members(artifact("llama-f32"))
    members.insert(2, ("zeros.bin", bytes(32 << 20)))
    package = write_tar(tmp_path / "m.mlcc", members)
    with pytest.raises(MlccError, match=r"member 'zeros.bin' is not listed in its manifest") as raised:
        unpack_package(package)
    assert "\n" not in str(raised.value)
    assert not [p for p in cache.iterdir()]  # nothing unpacked, no partial folder left


def test_package_member_larger_than_listed_is_refused(artifact, tmp_path, cache):
    from artifacts.package import unpack_package

    members = artifact_members(artifact("llama-f32"))
    members = [(name, data + bytes(1 << 20) if name == "tokenizer.json" else data) for name, data in members]
    with pytest.raises(MlccError, match=r"member 'tokenizer.json' is \d+ bytes, not the size its manifest lists"):
        unpack_package(write_tar(tmp_path / "m.mlcc", members))
    assert not [p for p in cache.iterdir()]


def test_package_whose_manifest_is_not_first_is_refused(artifact, tmp_path, cache):
    from artifacts.package import unpack_package

    members = artifact_members(artifact("llama-f32"))
    with pytest.raises(MlccError, match="its first member is not mlcc-manifest.json"):
        unpack_package(write_tar(tmp_path / "m.mlcc", members[1:] + members[:1]))


@pytest.fixture
def package(artifact, tmp_path) -> Path:
    from artifacts.package import write_package

    path = tmp_path / "m.mlcc"
    write_package(artifact("llama-f32"), path, compression="gzip")
    return path


def test_unpacking_onto_a_full_disk_says_so(package, cache, monkeypatch):
    """Not enough free space for the listed files: a disk error, not a corrupted package."""
    from artifacts import package as package_module

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(package_module.shutil, "disk_usage", lambda _path: usage(1 << 30, 1 << 30, 4096))
    with pytest.raises(MlccError) as raised:
        package_module.unpack_package(package)
    assert "no space left" in str(raised.value) and "corrupted" not in str(raised.value)
    assert not [p for p in cache.iterdir()]


def test_disk_filling_up_while_unpacking_says_so(package, cache, monkeypatch):
    """A write that fails with ENOSPC half-way is the disk's fault, not the package's."""
    from artifacts import package as package_module

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, _data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *_exc):
            self.file.close()

    def full_open(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        return FullDisk(file) if "w" in mode and Path(path).name != MANIFEST_NAME else file

    monkeypatch.setattr(package_module, "open", full_open, raising=False)
    with pytest.raises(MlccError) as raised:
        package_module.unpack_package(package)
    assert "no space left" in str(raised.value) and "corrupted" not in str(raised.value)
    assert not [p for p in cache.iterdir()]


# ---- item 10: weight shapes against the config, before the build --------------------------------------


@pytest.fixture
def no_build(monkeypatch):
    """The shape check must fire before the (slow) library build."""

    def build(_job):
        raise AssertionError("the library build started")

    monkeypatch.setattr("compiler.compile.build_in_child_process", build)


def test_hf_config_with_more_kv_heads_than_weights(hf_folder, tmp_path, no_build):
    from compiler.compile import compile_model

    folder = tmp_path / "model"
    shutil.copytree(hf_folder("llama-f32"), folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["hidden_size"] // config["num_attention_heads"] == 16
    config["num_key_value_heads"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MlccError) as raised:
        compile_model(str(folder), tmp_path / "out", quant="q4", progress=lambda _: None)
    message = str(raised.value)
    assert "model.layers.0.self_attn.k_proj.weight" in message and "[32, 64]" in message and "[48, 64]" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def write_llama_gguf(path: Path, kv_rows: int) -> Path:
    """A 1-layer llama GGUF with Q8_0 matrices: hidden 32, 2 heads of 16, metadata saying 2 KV heads, and K/V
    projections of `kv_rows` rows."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.add_token_merges([])
    rng = np.random.default_rng(0)

    def matrix(name: str, rows: int, cols: int) -> None:
        q8 = quantize(rng.standard_normal((rows, cols), dtype=np.float32), GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q8, raw_dtype=GGMLQuantizationType.Q8_0)

    matrix("token_embd.weight", 2, 32)
    for name in ("attn_norm", "ffn_norm"):
        writer.add_tensor(f"blk.0.{name}.weight", np.ones(32, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    matrix("blk.0.attn_q.weight", 32, 32)
    matrix("blk.0.attn_k.weight", kv_rows, 32)
    matrix("blk.0.attn_v.weight", kv_rows, 32)
    matrix("blk.0.attn_output.weight", 32, 32)
    matrix("blk.0.ffn_gate.weight", 64, 32)
    matrix("blk.0.ffn_up.weight", 64, 32)
    matrix("blk.0.ffn_down.weight", 32, 64)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_metadata_with_more_kv_heads_than_weights(tmp_path, no_build):
    from compiler.compile import compile_model

    gguf = write_llama_gguf(tmp_path / "m.gguf", kv_rows=16)
    with pytest.raises(MlccError) as raised:
        compile_model(str(gguf), tmp_path / "out", progress=lambda _: None)
    message = str(raised.value)
    assert "blk.0.attn_k.weight" in message and "[16, 32]" in message and "[32, 32]" in message
    assert not (tmp_path / "out").exists()


def test_gguf_with_matching_shapes_reaches_the_build(tmp_path, no_build):
    """The check passes a consistent file (and so cannot fail every GGUF)."""
    from compiler.compile import compile_model

    gguf = write_llama_gguf(tmp_path / "m.gguf", kv_rows=32)
    with pytest.raises(AssertionError, match="the library build started"):
        compile_model(str(gguf), tmp_path / "out", progress=lambda _: None)


# ---- item 11: a killed compile leaves no build running, and its staging folder is removed later ------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_compile_removes_stale_staging_folders(tmp_path):
    from compiler.compile import compile_model

    stale = tmp_path / f".art.partial-{dead_pid()}"
    stale_old = tmp_path / f".other.old-{dead_pid()}"
    live = tmp_path / f".other.partial-{os.getppid()}"  # pytest's parent: a compile still running
    for folder in (stale, stale_old, live):
        folder.mkdir()
        (folder / "model.so").write_bytes(b"x" * 1000)
    user_folder = tmp_path / "mine"  # not a staging folder: kept
    user_folder.mkdir()
    with pytest.raises(MlccError, match="model not found"):
        compile_model(str(tmp_path / "missing"), tmp_path / "art")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, user_folder.name])


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(condition, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_compile_ends_its_build_child(hf_folder, tmp_path):
    model = hf_folder("llama-f32")
    out = tmp_path / "art"
    compile_cmd = [sys.executable, "-m", "mlcc_cli", "compile", "--model", str(model), "--quant", "q0f32", "-o"]
    proc = subprocess.Popen([*compile_cmd, str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:

        def build_child() -> tuple[int, int] | None:
            for server in _children(proc.pid):
                if b"forkserver" in Path(f"/proc/{server}/cmdline").read_bytes():
                    children = _children(server)
                    if children:
                        return server, children[0]
            return None

        found = _wait_for(build_child, 120)
        assert found, f"no build child appeared: {proc.stderr.read1().decode() if proc.poll() is not None else ''}"
        forkserver, child = found
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _wait_for(lambda: not _running(child) and not _running(forkserver), 120)
        staging = tmp_path / f".art.partial-{proc.pid}"
        assert staging.is_dir() and not (staging / "model.so").exists()  # killed before it wrote the library
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    from compiler.compile import compile_model

    with pytest.raises(MlccError):
        compile_model(str(tmp_path / "missing"), out)
    assert not [p.name for p in tmp_path.iterdir()]


def test_prefill_computes_some_logits_on_a_gpu_when_no_prompt_ends():
    """A GPU kernel over zero rows is a launch with no blocks (an illegal address on an H100): a chunk that
    ends no prompt still takes its last token's logits there; the CPU computes none."""
    from runtime.engine import logit_positions

    ends = np.array([5, 9])
    assert logit_positions(ends, False, [False, False], at_least_one=False).tolist() == []
    assert logit_positions(ends, False, [False, False], at_least_one=True).tolist() == [8]
    assert logit_positions(ends, False, [True, False], at_least_one=True).tolist() == [4]
    assert logit_positions(ends, False, [True, True], at_least_one=False).tolist() == [4, 8]
    assert logit_positions(ends, True, None, at_least_one=True).tolist() == list(range(9))


def test_a_tied_head_equal_to_the_embedding_is_stored_and_loaded_once(artifact):
    """Gemma ties its output head to the embedding; where both are packed alike (float here; GPU and float-
    activation GGUF builds) the artifact stores the matrix once and the runtime passes one tensor for both.
    The logits still equal transformers' (tests/test_models.py)."""
    from safetensors import safe_open

    from runtime.artifact import LoadedArtifact

    folder = artifact("gemma-f32")
    manifest = load_manifest(folder)
    assert manifest.weights["aliases"] == {"output.weight": "token_embd.weight"}
    stored = set()
    for shard in manifest.weights["shards"]:
        with safe_open(str(folder / shard), framework="numpy") as f:
            stored |= set(f.keys())
    assert "token_embd.weight" in stored and "output.weight" not in stored
    names = manifest.weights["params"]
    loaded = LoadedArtifact(folder)
    assert loaded.params[names.index("output.weight")] is loaded.params[names.index("token_embd.weight")]
    assert "aliases" not in load_manifest(artifact("llama-q4")).weights  # untied
