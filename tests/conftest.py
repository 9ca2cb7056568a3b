"""Session-wide fixtures: tiny HF models and their compiled artifacts, built once per test run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_model  # noqa: E402

# name -> (arch, quant, config overrides)
VARIANTS = {
    "llama-f32": ("llama", "q0f32", {}),
    "mistral-f32": ("mistral", "q0f32", {}),
    "qwen2-f32": ("qwen2", "q0f32", {}),
    "llama-q4": ("llama", "q4", {}),
    # Room for prompts that describe tools (the tiny tokenizer spends a token on every few characters).
    "llama-q4-long": ("llama", "q4", {"max_position_embeddings": 1024}),
    "qwen2-f16": ("qwen2", "q0f16", {}),
    "phi3-f32": ("phi3", "q0f32", {}),
    "phi-f32": ("phi", "q0f32", {}),
    "gemma-f32": ("gemma", "q0f32", {}),
    "gemma2-f32": ("gemma2", "q0f32", {}),
    "gemma3-f32": ("gemma3", "q0f32", {}),
    **{f"{arch}-q4": (arch, "q4", {}) for arch in ("phi3", "phi", "gemma", "gemma2", "gemma3")},
    # Odd shapes (slow tests): 5 heads sharing 1 KV head, tied; 5 heads with 6 of 16 dims rotated; 3 heads, untied.
    "phi3-odd-f32": (
        "phi3",
        "q0f32",
        dict(
            hidden_size=80, num_attention_heads=5, num_key_value_heads=1, intermediate_size=72, tie_word_embeddings=True
        ),
    ),
    "phi-odd-f32": ("phi", "q0f32", dict(hidden_size=80, num_attention_heads=5, partial_rotary_factor=0.4)),
    # Phi-3-mini-4k's shape of attention: a sliding window (here 8 tokens), plain RoPE.
    "phi3-window-f32": ("phi3", "q0f32", dict(sliding_window=8, rope_scaling=None)),
    "gemma2-odd-f32": (
        "gemma2",
        "q0f32",
        dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3, head_dim=16, tie_word_embeddings=False),
    ),
    # Gemma 3 as llama.cpp's GGUF can state it: every 6th layer global (none of 2), query scale 1/sqrt(head_dim),
    # no RoPE scaling.
    "gemma3-gguf-f32": (
        "gemma3",
        "q0f32",
        dict(
            query_pre_attn_scalar=32,
            layer_types=["sliding_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        ),
    ),
    # Gemma 3 4B's RoPE as llama.cpp's GGUF states it: every 6th layer global, its frequencies scaled linearly by
    # 1/8 (the sliding layers' unscaled), query scale 1/sqrt(head_dim).
    "gemma3-linear-f32": (
        "gemma3",
        "q0f32",
        dict(
            num_hidden_layers=6,
            query_pre_attn_scalar=32,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        ),
    ),
    # 5 heads of 16, one KV head, tied embeddings, hidden and intermediate sizes not multiples of 32.
    "odd-tied-q4": (
        "llama",
        "q4",
        dict(
            hidden_size=80, num_attention_heads=5, num_key_value_heads=1, intermediate_size=72, tie_word_embeddings=True
        ),
    ),
}


@pytest.fixture(scope="session", autouse=True)
def amx_tiles() -> None:
    """Kernels compiled and run in this process (not through an artifact's loader, which asks itself) may use
    AMX tiles where the CPU has them: Linux hands them out on request only."""
    from artifacts.host_cpu import AMX_FLAGS, cpu_flags, enable_amx

    if set(AMX_FLAGS) <= cpu_flags():
        enable_amx()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlcc")


@pytest.fixture(scope="session")
def hf_folder(workdir):
    """HF folder of a variant, created on first use."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            arch, _, overrides = VARIANTS[name]
            made[name] = make_model(arch, workdir / f"hf-{name}", **overrides)
        return made[name]

    return get


@pytest.fixture(scope="session")
def artifact(workdir, hf_folder):
    """Compiled artifact folder of a variant, compiled on first use."""
    from compiler.compile import compile_model

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            _, quant, _ = VARIANTS[name]
            out = workdir / f"art-{name}"
            compile_model(str(hf_folder(name)), out, quant=quant, progress=lambda _: None)
            built[name] = out
        return built[name]

    return get


@pytest.fixture(scope="session")
def engine(artifact):
    from runtime import Engine

    engines: dict[str, object] = {}

    def get(name: str):
        if name not in engines:
            engines[name] = Engine(artifact(name))
        return engines[name]

    return get
