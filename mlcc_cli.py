"""The `mlcc` command line: compile a model into an artifact, run it.

Compiler-side modules are imported lazily inside the commands that need them, so `mlcc run` on an edge
device needs the runtime only. Every user-facing failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from artifacts.errors import MlccError


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn exceptions into one-line errors; tracebacks only with MLCC_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MlccError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as e:  # an internal failure still gets one line, never a traceback
            import os

            if os.environ.get("MLCC_DEBUG"):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _fail(f"internal error: {type(e).__name__}: {first} (set MLCC_DEBUG=1 for details)")

    return wrapper


@click.group()
@click.version_option(package_name="mlcc", message="mlcc %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="More logging on stderr.")
def main(verbose: bool) -> None:
    """mlcc: compile LLMs ahead of time with Apache TVM and run them anywhere."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


def _arch_help() -> str:
    """--arch help from the architecture registry (light: it imports no TVM); edge installs may lack it."""
    try:
        from model_defs import supported
    except ImportError:
        return "Architecture (read from config.json or the GGUF file when omitted)."
    return f"Architecture: {', '.join(supported())} (read from config.json or the GGUF file when omitted)."


def _artifact_or_default(artifact: str | None) -> str:
    """ARTIFACT, or the default model's artifact (compiled for this CPU on first use)."""
    if artifact is not None:
        return artifact
    from compiler.default_model import ensure_default_artifact

    return str(ensure_default_artifact())


@main.command()
@click.option("--model", "model", required=True, help="Local Hugging Face folder, hub id, or .gguf file.")
@click.option(
    "--arch",
    default=None,
    help=_arch_help(),
)
@click.option(
    "--quant",
    default=None,
    help="q0f32, q0f16, q2, q2a, q3, q3a, q4 (default for float checkpoints), q4a, q4f32, q5, q6, q8, "
    "gguf (GGUF files: their own block types, with 8-bit activations on AVX2 CPUs as llama.cpp, and llama.cpp's "
    "exact numbers where the block types allow; the default), gguf-fast (the same in mlcc's faster summation "
    "order) or gguf-f32 (same weights, float activations); see the README's Quantization section.",
)
@click.option(
    "--target",
    default="llvm",
    show_default=True,
    help="llvm (CPU), cuda, metal (or an Apple GPU tag such as apple/m1-gpu), webgpu or vulkan.",
)
@click.option(
    "--cuda-arch",
    "cuda_archs",
    multiple=True,
    help="CUDA architectures to compile for (repeatable or comma-separated; default sm_80,sm_86,sm_89,sm_90).",
)
@click.option(
    "--cpu",
    default="host",
    show_default=True,
    help="For --target llvm: host (this CPU's instruction sets), aarch64 (cross-compile: Raspberry Pi 5, Android, "
    "Apple silicon under Linux), or an x86-64 level: x86-64-v2 (any x86-64 CPU), x86-64-v3 (AVX2), "
    "x86-64-v4 (AVX-512).",
)
@click.option("--context-window", type=int, default=None, help="Override the model's context window.")
@click.option(
    "--lora",
    "loras",
    multiple=True,
    help="LoRA adapter to merge into the weights before quantization (repeatable): a PEFT folder for a Hugging Face "
    "model, a llama.cpp adapter (.gguf) for a GGUF model.",
)
@click.option("--lora-scale", type=float, default=1.0, show_default=True, help="Multiplies every adapter's alpha/r.")
@click.option(
    "--lora-slots",
    type=int,
    default=0,
    help="Serve up to N LoRA adapters over these weights without merging them (mlcc serve --adapter NAME=PATH); "
    "each request picks one by its model name (an X-LoRA model takes a slot per expert).",
)
@click.option("--lora-rank", type=int, default=16, show_default=True, help="The highest adapter rank the slots hold.")
@click.option(
    "--kv-dtype",
    type=click.Choice(["float16", "float32"]),
    default=None,
    help="The KV cache's element type (default: the activations'). float16 halves the cache's memory and what "
    "decode reads at long contexts; with float32 activations the attention's inputs and output are rounded to it "
    "(a gguf build's llama.cpp-exact numbers then are close, no longer exact).",
)
@click.option("-o", "--output", required=True, help="Artifact folder to write.")
@friendly_errors
def compile(
    model: str,
    arch: str | None,
    quant: str,
    target: str,
    cuda_archs: tuple[str, ...],
    cpu: str,
    context_window: int | None,
    loras: tuple[str, ...],
    lora_scale: float,
    lora_slots: int,
    lora_rank: int,
    kv_dtype: str | None,
    output: str,
):
    """Compile MODEL into an artifact folder."""
    from compiler.compile import compile_model
    from compiler.progress import StageProgress
    from compiler.targets import TargetRequest

    archs = tuple(a.strip() for value in cuda_archs for a in value.split(",") if a.strip())
    with StageProgress() as progress:
        compile_model(
            model,
            output,
            arch=arch,
            quant=quant,
            target=TargetRequest(target, archs, cpu),
            context_window=context_window,
            progress=progress,
            loras=loras,
            lora_scale=lora_scale,
            lora_slots=lora_slots,
            lora_rank=lora_rank,
            kv_dtype=kv_dtype,
        )


def speculation_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--draft, --prompt-lookup and --draft-tokens: speculative decoding (runtime/speculative.py)."""
    options = [
        click.option("--draft", default=None, help="Speculative decoding with this draft artifact (same tokenizer)."),
        click.option(
            "--prompt-lookup", is_flag=True, help="Speculative decoding with n-gram drafts from the prompt and output."
        ),
        click.option("--draft-tokens", type=int, default=4, show_default=True, help="Tokens drafted per step."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _speculation(draft: str | None, prompt_lookup: bool, draft_tokens: int) -> dict[str, Any]:
    """The Engine's speculative decoding options."""
    return {"draft": draft, "prompt_lookup": prompt_lookup, "draft_tokens": draft_tokens}


@main.command()
@click.argument("artifact", required=False)
@click.option("--prompt", default=None, help="Answer this prompt and exit (only the answer goes to stdout).")
@click.option("--raw", is_flag=True, help="Plain completion, no chat template.")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--json-schema", "json_schema_file", default=None, help="Answer JSON valid against the schema in FILE.")
@click.option("--regex", default=None, help="Answer text that fully matches the regular expression R.")
@click.option(
    "--grammar", "grammar_file", default=None, help="Answer text that follows the grammar in FILE (Lark/EBNF or GBNF)."
)
@click.option(
    "--no-verify", is_flag=True, help="Skip sha256 checks of the weights and tokenizer (the library is always checked)."
)
@click.option("--threads", type=int, default=None, help="CPU threads (default: all cores).")
@speculation_options
@friendly_errors
def run(
    artifact: str,
    prompt: str | None,
    raw: bool,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: tuple[str, ...],
    json_schema_file: str | None,
    regex: str | None,
    grammar_file: str | None,
    no_verify: bool,
    threads: int | None,
    draft: str | None,
    prompt_lookup: bool,
    draft_tokens: int,
):
    """Chat with ARTIFACT, or answer one --prompt. Without ARTIFACT: the default model, SmolLM2-135M-Instruct,
    compiled for this CPU on first use.

    In the chat, Ctrl-C stops a reply; /help lists the commands."""
    from runtime import Engine, SamplingParams

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=list(stop),
        json_schema=_read_text(json_schema_file, "--json-schema"),
        regex=regex,
        grammar=_read_text(grammar_file, "--grammar"),
    )
    from runtime.constraints import check_constraint

    check_constraint(params.constraint)  # before the model loads
    speculation = _speculation(draft, prompt_lookup, draft_tokens)
    engine = Engine(_artifact_or_default(artifact), verify=not no_verify, threads=threads, **speculation)
    if prompt is not None:
        pieces = engine.stream(prompt, params, raw=True) if raw else _chat_once(engine, prompt, params)
        for piece in pieces:
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        return
    from runtime.chat import TerminalChat

    TerminalChat(engine, params, raw).run()


@main.command()
@click.argument("artifact", required=False)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", default=None, help="Require `Authorization: Bearer KEY` on every route but /health.")
@click.option("--max-batch-size", type=int, default=None, help="Requests decoded together (default: the artifact's).")
@click.option(
    "--kv-cache-tokens",
    type=int,
    default=None,
    help="KV cache size in tokens (default: a full context per batch slot, at most 2 GiB of K/V).",
)
@click.option(
    "--prefill-chunk",
    type=int,
    default=None,
    help="Prompt tokens prefilled per engine step, between decode steps (default and maximum: the artifact's; "
    "at least one 128-token canonical chunk of one prompt).",
)
@click.option(
    "--max-queued",
    type=click.IntRange(min=1),
    default=None,
    help="Sequences (prompts x n) in flight, running or waiting, before requests get 429 (default: 16 per batch slot).",
)
@click.option("--no-prefix-cache", is_flag=True, help="Do not reuse the KV of earlier prompts' shared prefixes.")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="NAME=PATH",
    help="A PEFT LoRA adapter or X-LoRA model folder to serve as model NAME (repeatable; the artifact needs "
    "--lora-slots, an X-LoRA model one per expert).",
)
@click.option(
    "--no-verify", is_flag=True, help="Skip sha256 checks of the weights and tokenizer (the library is always checked)."
)
@click.option("--threads", type=int, default=None, help="CPU threads (default: all cores).")
@speculation_options
@friendly_errors
def serve(
    artifact: str | None,
    host: str,
    port: int,
    api_key: str | None,
    max_batch_size: int | None,
    kv_cache_tokens: int | None,
    prefill_chunk: int | None,
    max_queued: int | None,
    no_prefix_cache: bool,
    adapters: tuple[str, ...],
    no_verify: bool,
    threads: int | None,
    draft: str | None,
    prompt_lookup: bool,
    draft_tokens: int,
):
    """Serve ARTIFACT over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions).

    Without ARTIFACT: the default model, SmolLM2-135M-Instruct, compiled for this CPU on first use."""
    from runtime.server import serve as serve_http

    serve_http(
        _artifact_or_default(artifact),
        host=host,
        port=port,
        api_key=api_key,
        max_batch_size=max_batch_size,
        kv_cache_tokens=kv_cache_tokens,
        prefill_chunk=prefill_chunk,
        max_queued=max_queued,
        prefix_cache=not no_prefix_cache,
        adapters=_named_paths(adapters),
        verify=not no_verify,
        threads=threads,
        **_speculation(draft, prompt_lookup, draft_tokens),
    )


def _named_paths(values: tuple[str, ...]) -> dict[str, str]:
    named: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise MlccError(f"--adapter takes NAME=PATH, not {value!r}")
        if name in named:
            raise MlccError(f"--adapter {name} is given twice")
        named[name] = path
    return named


@main.command()
@click.argument("artifact", required=False)
@click.option("-o", "--output", required=True, help="Package file to write, e.g. model.mlcc.")
@click.option(
    "--compression",
    type=click.Choice(["auto", "zstd", "gzip", "none"]),
    default="auto",
    show_default=True,
    help="auto: zstd when the zstandard module is installed, else gzip.",
)
@friendly_errors
def package(artifact: str | None, output: str, compression: str):
    """Pack ARTIFACT into one file for edge devices; `mlcc run`/`serve` accept the file directly.

    Without ARTIFACT: the default model, SmolLM2-135M-Instruct, compiled for this CPU on first use."""
    from artifacts.package import write_package

    used = write_package(_artifact_or_default(artifact), output, compression)
    click.echo(f"package written to {output} ({used})", err=True)


@main.command()
@click.argument("artifact", required=False)
@friendly_errors
def inspect(artifact: str | None):
    """Show what ARTIFACT (folder or package) holds and whether its checksums are valid.

    Without ARTIFACT: the default model, SmolLM2-135M-Instruct, compiled for this CPU on first use."""
    from artifacts.inspect import inspect_artifact

    rows, valid = inspect_artifact(_artifact_or_default(artifact))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        click.echo(f"{label + ':':<{width + 1}} {value}")
    if not valid:
        sys.exit(1)


@main.command("list")
@friendly_errors
def list_artifacts() -> None:
    """List the artifacts in the cache (~/.cache/mlcc, or $MLCC_CACHE): compiled models and unpacked packages."""
    from artifacts.manifest import load_manifest
    from compiler.default_model import cache_dir, cached_artifacts

    folders = cached_artifacts()
    if not folders:
        click.echo(f"no artifacts in {cache_dir()}; `mlcc run` compiles the default model there", err=True)
        return
    rows = [("size", "arch", "quant", "target", "path")]
    for folder in folders:
        try:
            m = load_manifest(folder)
        except MlccError as e:
            rows.append(("?", "?", "?", "?", f"{folder} ({e})"))
            continue
        quant = m.quant.get("name", "?") + (f" ({m.quant['numerics']} numerics)" if "numerics" in m.quant else "")
        size = _human_size(sum(f["size"] for f in m.files.values()))
        rows.append((size, m.arch, quant, str(m.target.get("name", "?")), str(folder)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[4]]))


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _read_text(path: str | None, option: str) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise MlccError(f"{option}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _chat_once(engine: Any, prompt: str, params: Any):
    if engine.tokenizer.chat_template is None:
        return engine.stream(prompt, params, raw=True)
    return engine.chat([{"role": "user", "content": prompt}], params)


@main.command()
@click.argument("artifact", required=False)
@click.option("--threads", type=int, multiple=True, help="Thread counts to measure (repeatable; default: all cores).")
@click.option("--runs", type=int, default=5, show_default=True, help="Runs per measurement (the median is shown).")
@speculation_options
@friendly_errors
def bench(
    artifact: str | None, threads: tuple[int, ...], runs: int, draft: str | None, prompt_lookup: bool, draft_tokens: int
) -> None:
    """Prefill (128 and 512 tokens) and decode (128 tokens, after a short prompt and after a 2000-token one)
    speed of ARTIFACT on this machine (without ARTIFACT: the default model, compiled for this CPU on first use).
    With --draft or --prompt-lookup: greedy decoding of a summarise-this-text prompt with and without speculative
    decoding, its speedup and acceptance rate.

    For a side-by-side table with llama.cpp on the same GGUF: python bench/cpu.py ARTIFACT MODEL.gguf"""
    import os

    from runtime.benchmark import measure, measure_speculative

    artifact = _artifact_or_default(artifact)
    counts = threads or (os.cpu_count() or 1,)
    if draft is not None or prompt_lookup:
        click.echo(f"{'threads':>7} {'plain tok/s':>11} {'speculative':>11} {'speedup':>7} {'accepted':>8}")
        for count in counts:
            row = measure_speculative(artifact, count, runs, **_speculation(draft, prompt_lookup, draft_tokens))
            click.echo(
                f"{count:>7} {row.plain:>11.1f} {row.speculative:>11.1f} {row.speedup:>6.2f}x {row.acceptance:>8.0%}"
            )
        return
    click.echo(f"{'threads':>7} {'test':>12} {'tokens/s':>9}")
    for count in counts:
        for test, rate in measure(artifact, count, runs).items():
            click.echo(f"{count:>7} {test:>12} {rate:>9.1f}")


if __name__ == "__main__":
    main()
