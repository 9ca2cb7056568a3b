"""Runtime pieces: isolation from the compiler, sampling, streaming, stop conditions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from artifacts import MlccError
from runtime import SamplingParams
from runtime.sampler import sample

ROOT = Path(__file__).resolve().parent.parent
COMPILER_SIDE = {"compiler", "tir_kernels", "model_defs", "quant_schemes"}


def test_runtime_sources_import_no_compiler_side():
    for path in (ROOT / "runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not {n.split(".")[0] for n in names} & COMPILER_SIDE, f"{path} imports {names}"


def test_running_an_artifact_loads_no_compiler_side(artifact):
    code = (
        "import sys, runtime\n"
        f"e = runtime.Engine({str(artifact('llama-q4'))!r})\n"
        "e.generate('Hi', runtime.SamplingParams(max_tokens=2))\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(COMPILER_SIDE)!r})\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_cpu_weights_in_one_huge_page_mapping_keep_their_values():
    from runtime.artifact import HUGE_PAGE, TENSOR_ALIGNMENT, _in_huge_pages

    rng = np.random.default_rng(0)
    arrays = {
        "codes": rng.integers(0, 256, (3, 37), dtype=np.uint8),  # odd sizes: the next tensor still 64-aligned
        "scales": rng.standard_normal((5,)).astype(np.float16),
        "empty": np.zeros((0, 4), np.float32),
        "norm": rng.standard_normal((2, 3, 7)).astype(np.float32),
    }
    expected = {name: array.copy() for name, array in arrays.items()}
    names = list(arrays)
    tensors = _in_huge_pages(arrays, names)
    assert not arrays, "the file's copies are let go"
    views = [np.from_dlpack(tensor) for tensor in tensors]
    for name, view in zip(names, views):
        np.testing.assert_array_equal(view, expected[name])
        assert view.dtype == expected[name].dtype
    addresses = [view.ctypes.data for view in views]
    assert addresses[0] % HUGE_PAGE == 0
    assert all(address % TENSOR_ALIGNMENT == 0 for address in addresses)
    assert len(set(addresses[:2] + addresses[3:])) == 3


def test_sampling_controls():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(500).astype(np.float32)
    best = int(logits.argmax())
    assert sample(logits, SamplingParams(temperature=0), rng) == best
    assert sample(logits, SamplingParams(temperature=1.0, top_k=1), rng) == best
    assert sample(logits, SamplingParams(temperature=1.0, top_p=1e-6), rng) == best
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert {sample(logits, SamplingParams(top_k=5), rng) for _ in range(200)} <= top5
    picks = [sample(logits, SamplingParams(temperature=1.0), np.random.default_rng(7)) for _ in range(2)]
    assert picks[0] == picks[1]
    with pytest.raises(MlccError):
        SamplingParams(max_tokens=0).validate()
    with pytest.raises(MlccError):
        SamplingParams(top_p=0).validate()


def test_stream_pieces_join_to_the_generated_text(engine):
    eng = engine("llama-q4")
    params = dict(max_tokens=20, temperature=0.8, seed=5)
    pieces = list(eng.stream("Hello", SamplingParams(**params)))
    assert len(pieces) > 1
    assert "".join(pieces) == eng.generate("Hello", SamplingParams(**params))[0].text


def test_stop_string_and_max_tokens(engine):
    eng = engine("llama-q4")
    full = eng.generate("Hello", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    assert stop.strip()
    cut = eng.generate("Hello", SamplingParams(max_tokens=24, temperature=0, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    streamed = "".join(eng.stream("Hello", SamplingParams(max_tokens=24, temperature=0, stop=[stop])))
    assert streamed == cut.text


def test_eos_stops_generation(engine):
    eng = engine("llama-q4")
    first = eng.generate("Paris", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    # The first token that has not appeared before: generation must stop right before it.
    at = next(i for i, t in enumerate(first.token_ids) if i > 0 and t not in first.token_ids[:i])
    params = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[first.token_ids[at]])
    stopped = eng.generate("Paris", params)[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == first.token_ids[:at]


def test_more_requests_than_batch_slots(engine):
    eng = engine("llama-q4")
    prompts = [f"Hello {i}" for i in range(eng.max_batch_size + 3)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    together = eng.generate(prompts, params)
    assert [r.token_ids for r in together] == [eng.generate(p, params)[0].token_ids for p in prompts]
