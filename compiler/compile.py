"""config -> nn model -> quantize -> Relax IRModule -> library + converted weights -> artifact folder.

The artifact is assembled in a temporary folder beside the output and renamed into place at the end, so a
failed or interrupted compile leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from artifacts import MANIFEST_NAME, Manifest
from artifacts.errors import MlccError
from artifacts.lora_formats import Adapter, load_adapter, load_gguf_adapter
from artifacts.manifest import describe_files
from artifacts.partials import partial_path, remove_stale_partials
from artifacts.weights import ShardWriter
from compiler.build import BuildJob, build_in_child_process
from compiler.experts import stack_expert_shapes, stack_experts
from compiler.gguf_source import GGUFSource
from compiler.lora import GGUFLoraMerge, LoraMerge
from compiler.lora_slots import block_linears, check_slots, lora_param_names, manifest_section, source_modules
from compiler.numerics import numerics_target, use_numerics
from compiler.source import ModelSource, resolve_model
from compiler.targets import TargetRequest, resolve_target
from compiler.weight_shapes import SourceShapes, check_weight_shapes
from model_defs import arch_for_gguf, arch_for_model_type, get_arch, get_entry
from quant_schemes import QuantScheme, convert_tensor, get_scheme
from quant_schemes.gguf_native import GGUFNativeScheme
from tir_kernels.numerics import Numerics

log = logging.getLogger("mlcc.compile")

DEFAULT_PAGE_SIZE = 16
DEFAULT_PREFILL_CHUNK = 512
DEFAULT_MAX_BATCH = 8
# What `kv_dtype` may be (of what a manifest may record, artifacts.manifest.KV_DTYPES): float16 halves the cache
# and what long-context decode reads (the attention's q, k, v and output rounded to it); float32 keeps float
# activations' numbers.
KV_DTYPE_CHOICES = ("float16", "float32")


def detect_arch(config: dict[str, Any]) -> str:
    return arch_for_model_type(str(config.get("model_type", ""))).name


def compile_model(
    model: str,
    output: str | Path,
    arch: str | None = None,
    quant: str | None = None,
    target: str | TargetRequest = "llvm",
    context_window: int | None = None,
    progress: Callable[[str], None] = log.info,
    loras: Sequence[str | Path] = (),
    lora_scale: float = 1.0,
    lora_slots: int = 0,
    lora_rank: int = 16,
    kv_dtype: str | None = None,
) -> Manifest:
    """Compile `model` (HF folder, hub id or .gguf file) into the artifact folder `output`.

    `quant` defaults to q4 for float checkpoints and to the file's own block types ("gguf") for GGUF.
    `loras`: LoRA adapters merged into the weights before quantization, each scaled by `lora_scale` on top of its
    own alpha / r: PEFT folders into an HF model, llama.cpp's GGUF adapters into a GGUF file. `lora_slots`: serve
    up to that many adapters of rank <= `lora_rank` over the weights, chosen per request (compiler/lora_slots.py).
    `kv_dtype`: the KV cache's element type, one of KV_DTYPE_CHOICES (default: the activations')."""
    if kv_dtype is not None and kv_dtype not in KV_DTYPE_CHOICES:
        raise MlccError(f"unsupported KV cache type {kv_dtype!r}: choose one of {', '.join(KV_DTYPE_CHOICES)}")
    output = Path(output)
    if output.exists() and not (output / MANIFEST_NAME).is_file():
        raise MlccError(f"output exists and is not an mlcc artifact, refusing to overwrite: {output}")
    if output.parent.is_dir():
        remove_stale_partials(output.parent)  # staging folders of compiles that were killed
    target_request = TargetRequest(target) if isinstance(target, str) else target
    target_spec = resolve_target(target_request)
    progress(f"reading {model}")
    source_format = "gguf" if str(model).endswith(".gguf") else "hf"  # which adapter files it (and its slots) take
    adapters = _read_adapters(loras, lora_scale, source_format)
    if source_format == "gguf":
        plan = _plan_gguf(Path(model), arch, quant, adapters, progress)
    else:
        plan = _plan_hf(model, arch, quant, adapters)
    arch_name, config, scheme, tensors, write_tokenizer, shapes = plan

    scheme.prepare(target_spec.target)
    numerics = scheme.numerics  # decided here, once: the build job and the manifest carry it
    target_spec = numerics_target(target_spec, numerics)
    net = get_arch(arch_name).Model(config)
    check_weight_shapes(net, shapes(), config.tie_embeddings)
    slotted = block_linears(net) if lora_slots else {}
    check_slots(slotted, lora_slots, lora_rank)
    for note in scheme.quantize_model(net):  # tensors padded or kept wider, for the compile summary
        progress(note)
    use_numerics(net, numerics, target_spec, scheme.dtype)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = partial_path(output)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        progress(f"building the library: {arch_name} ({scheme.name}) for {target_spec.name}, with TVM")
        slots = (lora_slots, lora_rank) if lora_slots else (0, 0)
        library = staging / target_spec.library_name
        job = BuildJob(arch_name, config, scheme, target_request, library, numerics, slots, kv_dtype)
        param_names = build_in_child_process(job)
        progress("converting the weights")
        converted = [name for name in param_names if name not in lora_param_names(slotted)]  # runtime-made
        shards = _convert_weights(tensors, net, converted, staging, config.tie_embeddings)
        tokenizer = write_tokenizer(staging)
        window = context_window or config.context_window
        chunk = min(DEFAULT_PREFILL_CHUNK, window)
        if config.sliding_window:
            # The ragged kernel does not apply the window inside a chunk, and a row that sees no cached
            # token yields NaN, so a chunk must stay below the window.
            chunk = max(1, min(chunk, config.sliding_window - 1))
        manifest = Manifest(
            arch=arch_name,
            model_config=asdict(config),
            quant=scheme.describe(),
            target=target_spec.describe(),
            library=target_spec.library_name,
            weights={
                "shards": shards.shards,
                "params": param_names,
                "bytes": shards.total_bytes,
                **({"aliases": shards.aliases} if shards.aliases else {}),
            },
            tokenizer=tokenizer,
            context_window=window,
            kv_cache={
                "page_size": DEFAULT_PAGE_SIZE,
                "prefill_chunk_size": chunk,
                "max_batch_size": DEFAULT_MAX_BATCH,
                "sliding_window": config.sliding_window,
                "dtype": kv_dtype or scheme.dtype,
                # batch_prefill then takes each token's prompt length (LongRoPE); see compiler/entry_points.py
                "rope_switch_length": net.attention_layout().rope_switch_length,
            },
            chat_template=tokenizer.pop("chat_template"),
            lora_slots=manifest_section(
                slotted, source_modules(shapes()), lora_slots, lora_rank, scheme.dtype, source_format
            )
            if lora_slots
            else None,
            versions={"mlcc": _mlcc_version(), "tvm": tvm.__version__},
        )
        files = [target_spec.library_name, *shards.shards, *tokenizer["files"]]
        manifest.files = describe_files(staging, files)
        manifest.write(staging)
        _replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"artifact written to {output.resolve()}")
    return manifest


Plan = tuple[
    str,
    Any,
    QuantScheme,
    Callable[[], Iterator[tuple[str, np.ndarray]]],
    Callable[[Path], dict],
    Callable[[], SourceShapes],
]


def _read_adapters(paths: Sequence[str | Path], scale: float, source_format: str) -> list[Adapter]:
    """The adapters to merge, each in the format of the model's names: a PEFT folder names an HF checkpoint's
    tensors, a llama.cpp GGUF adapter a GGUF file's (whose Q/K rows llama.cpp's converter reorders per
    architecture, which only its convert_lora_to_gguf.py knows how to follow)."""
    adapters = []
    for path in paths:
        if str(path).endswith(".gguf") != (source_format == "gguf"):
            if source_format == "gguf":
                raise MlccError(
                    f"{path}: a GGUF model takes llama.cpp LoRA adapters (.gguf); convert a PEFT folder with "
                    "llama.cpp's convert_lora_to_gguf.py"
                )
            raise MlccError(f"{path}: a Hugging Face model takes PEFT adapter folders, GGUF adapters a GGUF model")
        adapters.append(load_gguf_adapter(path, scale) if source_format == "gguf" else load_adapter(path, scale))
    return adapters


def _plan_hf(model: str, arch: str | None, quant: str | None, adapters: list[Adapter]) -> Plan:
    scheme = get_scheme(quant or "q4")
    source = resolve_model(model)
    merge = LoraMerge(adapters, source.tensor_shapes())
    arch_name = (arch or detect_arch(source.config)).lower()
    entry = get_entry(arch_name)
    arch_module = entry.load()
    config = arch_module.config_from_hf(source.config)
    if "lm_head.weight" not in {name for name, _ in source.tensor_names()}:
        config.tie_embeddings = True

    def mapped() -> Iterator[tuple[str, np.ndarray]]:
        for hf_name, array in source.tensors():
            try:
                name = arch_module.map_hf_name(hf_name)
            except KeyError:
                raise MlccError(f"unexpected tensor {hf_name!r} in {source.folder}") from None
            if name is not None:
                yield name, entry.convert_hf_tensor(name, merge(hf_name, array))

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        return stack_experts(mapped(), getattr(config, "num_experts", 0))  # one tensor per expert -> stacked

    def shapes() -> SourceShapes:
        """Model name -> (HF name, shape), from the headers; names the conversion refuses are left to it."""
        named = {}
        for hf_name, shape in source.tensor_shapes().items():
            try:
                name = arch_module.map_hf_name(hf_name)
            except KeyError:
                continue
            if name is not None:
                named[name] = (hf_name, shape)
        return stack_expert_shapes(named)

    return arch_name, config, scheme, tensors, lambda folder: _copy_tokenizer(source, folder), shapes


def _plan_gguf(
    path: Path, arch: str | None, quant: str | None, adapters: list[Adapter], progress: Callable[[str], None]
) -> Plan:
    if not path.is_file():
        raise MlccError(f"model not found: {path}")
    source = GGUFSource(path)
    arch_name = arch or arch_for_gguf(source.arch, source.arch_meta()).name
    config = get_arch(arch_name).config_from_gguf(source.arch_meta(), "output.weight" in source.tensors_by_name)
    native = quant in (None, "gguf", "gguf-fast", "gguf-f32")
    if native:  # the file's blocks; adapted tensors decoded, merged and encoded again, one at a time
        merge = GGUFLoraMerge(adapters, source.tensor_shapes(), source.tensor_types())
        if kept := merge.kept_float():
            types = ", ".join(sorted({merge.source_types[name].name for name in kept}))
            progress(f"{len(kept)} tensors merged with LoRA are kept as F32 (gguf-py cannot encode {types})")

        def tensors() -> Iterator[tuple[str, np.ndarray]]:
            return merge(source.tensors(raw=True))

        activations = "f32" if quant == "gguf-f32" else "q8"
        scheme: QuantScheme = GGUFNativeScheme(
            merge.types,
            activations=activations,
            numerics=Numerics.MLCC if quant == "gguf-fast" else Numerics.LLAMACPP,
            rows=source.tensor_rows(),
            elements={name: int(np.prod(shape)) for name, shape in source.tensor_shapes().items()},
            tied_head="output.weight" not in source.tensors_by_name,
        )
    else:  # float32 tensors, merged like an HF checkpoint's
        float_merge = LoraMerge(adapters, source.tensor_shapes())

        def tensors() -> Iterator[tuple[str, np.ndarray]]:
            return ((name, float_merge(name, array)) for name, array in source.tensors(raw=False))

        scheme = get_scheme(quant)
    shapes = {name: (name, shape) for name, shape in source.tensor_shapes().items()}
    return arch_name, config, scheme, tensors, source.write_tokenizer, lambda: shapes


def _convert_weights(
    tensors: Callable[[], Iterator[tuple[str, np.ndarray]]],
    net: Any,
    param_names: list[str],
    folder: Path,
    tie: bool,
) -> ShardWriter:
    """Convert the source tensors (already named like the model) one at a time into shards."""
    writer = ShardWriter(folder)
    wanted = set(param_names)
    for name, array in tensors():
        if tie and name == "output.weight":
            continue
        embedding: dict[str, np.ndarray] = {}
        for target_name in [name, "output.weight"] if (tie and name == "token_embd.weight") else [name]:
            try:
                converted = convert_tensor(net, target_name, array)
            except (AttributeError, ValueError) as e:
                raise MlccError(f"tensor {name!r} does not fit the model: {e}") from None
            for param, value in converted.items():
                if param not in wanted:
                    raise MlccError(f"tensor {name!r} maps to unknown parameter {param!r}")
                if twin := _same_in_embedding(param, value, embedding):
                    writer.alias(param, twin)
                else:
                    writer.add(param, value)
                wanted.discard(param)
            if target_name == "token_embd.weight":
                embedding = converted
    writer.flush()
    if wanted:
        missing = ", ".join(sorted(wanted)[:5])
        raise MlccError(f"the checkpoint lacks {len(wanted)} tensors the model needs (e.g. {missing})")
    return writer


def _same_in_embedding(param: str, value: np.ndarray, embedding: dict[str, np.ndarray]) -> str | None:
    """The embedding's parameter that a tied output head's `param` equals byte for byte, or None: where both are
    packed alike (float schemes, `q8`, GGUF builds for GPUs or with float activations, and the CPU's int8 builds
    whose embedding is stored in its head's layout: quant_schemes/gguf_native.py)."""
    twin = "token_embd." + param.removeprefix("output.") if param.startswith("output.") else None
    stored = embedding.get(twin) if twin else None
    if stored is None or stored.dtype != value.dtype or stored.shape != value.shape:
        return None
    return twin if np.array_equal(stored.view(np.uint8), np.ascontiguousarray(value).view(np.uint8)) else None


def _special(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _eos_ids(source: ModelSource) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = source.folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids.extend(value if isinstance(value, list) else [value] if value is not None else [])
    return sorted(set(ids))


def _copy_tokenizer(source: ModelSource, folder: Path) -> dict[str, Any]:
    files = []
    for path in source.tokenizer_files:
        shutil.copy(path, folder / path.name)
        files.append(path.name)
    tok_config: dict[str, Any] = {}
    if (source.folder / "tokenizer_config.json").is_file():
        tok_config = json.loads((source.folder / "tokenizer_config.json").read_text())
    template = tok_config.get("chat_template")
    if template is None and (source.folder / "chat_template.jinja").is_file():  # transformers >= 4.50
        template = (source.folder / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return {
        "files": files,
        "bos_token": _special(tok_config.get("bos_token")),
        "eos_token": _special(tok_config.get("eos_token")),
        "eos_token_ids": _eos_ids(source),
        "chat_template": template,
    }


def _replace(staging: Path, output: Path) -> None:
    """Move the finished artifact into place; an older artifact at `output` is replaced."""
    if output.exists():
        old = partial_path(output, "old")
        output.rename(old)
        staging.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(output)


def _mlcc_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlcc")
    except PackageNotFoundError:
        return "dev"
