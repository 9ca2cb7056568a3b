"""LoRA adapter files read into per-tensor factors: PEFT's (`adapter_config.json` + `adapter_model.safetensors`)
and llama.cpp's (a GGUF file of `general.type` "adapter").

Shared by compile (merging into the float weights, compiler/lora.py) and the runtime (adapter slots,
runtime/adapters.py). PEFT: linear and embedding LoRA, any target modules and ranks (`rank_pattern`,
`alpha_pattern`), rsLoRA (s = alpha / sqrt(r) instead of alpha / r), LoRA on biases, `fan_in_fan_out`, and whole
modules the adapter saves (`modules_to_save`, resized-embedding copies). DoRA and other PEFT methods are refused
in one line. Names are the base checkpoint's own tensor names. llama.cpp: `<tensor>.lora_a` / `.lora_b` pairs named
after the GGUF base's tensors (Q and K rows already in its order) and one alpha, s = alpha / r (1 when alpha is 0,
as llama.cpp does).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from safetensors import SafetensorError, safe_open

from artifacts.errors import MlccError

PREFIX = "base_model.model."
XLORA_EXPERT_PREFIX = "base_model.lora_model.model."  # how an X-LoRA model's experts name their tensors
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


@dataclass
class Adapter:
    """One PEFT LoRA adapter: per base tensor name, the low-rank factors and their scale, or a replacement."""

    path: Path
    scale: float = 1.0  # the user's scale: of the low-rank changes, and the blend towards a saved module
    factors: dict[str, tuple[np.ndarray, np.ndarray, float]] = field(default_factory=dict)  # name -> (A, B, s)
    bias_deltas: dict[str, np.ndarray] = field(default_factory=dict)  # bias name -> s * lora_B bias
    replacements: dict[str, np.ndarray] = field(default_factory=dict)  # name -> tensor saved whole

    def base_names(self) -> set[str]:
        return {*self.factors, *self.bias_deltas, *self.replacements}


def load_adapter(path: str | Path, user_scale: float = 1.0) -> Adapter:
    """Read a PEFT LoRA adapter folder; `user_scale` multiplies every module's scale (mlcc's --lora-scale)."""
    folder = Path(path).expanduser()
    config_path, weights_path = folder / CONFIG_FILE, folder / ADAPTER_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise MlccError(f"not a PEFT LoRA adapter (needs {CONFIG_FILE} and {ADAPTER_FILE}): {folder}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlccError(f"invalid {CONFIG_FILE} in {folder}: {e}") from None
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise MlccError(f"{folder}: only LoRA adapters can be merged, this one is {kind}")
    if config.get("use_dora"):
        raise MlccError(f"{folder}: DoRA adapters are not supported (their merge needs the weight norms)")
    try:
        with safe_open(str(weights_path), framework="numpy") as f:
            tensors = {key: f.get_tensor(key).astype(np.float32) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise MlccError(f"cannot read {weights_path}: {e}") from None

    adapter = Adapter(folder, user_scale)
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX).removeprefix(XLORA_EXPERT_PREFIX)
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(weight|bias))?", name)
        if match:
            module, part, kind = match.groups()
            modules.setdefault(module, {})[part + (".bias" if kind == "bias" else "")] = value
        elif name.endswith(("lora_magnitude_vector", ".lora_E")):
            raise MlccError(f"{folder}: tensor {key} belongs to a LoRA variant mlcc cannot merge")
        else:  # a module saved whole (modules_to_save, or the base copy PEFT keeps of adapted embeddings)
            adapter.replacements[name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = value

    for module, parts in modules.items():
        a = parts.get("lora_A", parts.get("lora_embedding_A"))
        b = parts.get("lora_B", parts.get("lora_embedding_B"))
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise MlccError(f"{folder}: module {module} has no matching lora_A/lora_B pair")
        scale = _scale(config, module, rank=a.shape[0]) * user_scale
        if "lora_embedding_A" in parts:  # A: [r, vocab], B: [hidden, r]; the embedding is [vocab, hidden]
            a, b = b.T, a.T
        elif config.get("fan_in_fan_out"):
            a, b = b.T, a.T
        adapter.factors[f"{module}.weight"] = (a, b, scale)
        if "lora_B.bias" in parts:
            adapter.bias_deltas[f"{module}.bias"] = scale * parts["lora_B.bias"]
    return adapter


def _scale(config: dict, module: str, rank: int) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA), with PEFT's per-module alpha_pattern overrides."""
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    return alpha / (rank**0.5 if config.get("use_rslora") else rank)


def load_gguf_adapter(path: str | Path, user_scale: float = 1.0) -> Adapter:
    """Read a llama.cpp LoRA adapter (GGUF); factor names are the GGUF base's tensor names. Factors may be stored
    in any type gguf-py decodes (convert_lora_to_gguf.py writes F32, F16, BF16 or Q8_0)."""
    path = Path(path).expanduser()
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {
            name: field.contents()
            for name, field in reader.fields.items()
            if name.startswith(("general.t", "adapter."))
        }
        truncated = next((t.name for t in reader.tensors if t.data.nbytes != t.n_bytes), None)
    except Exception as e:  # gguf raises ValueError/struct errors/OSError on damaged files
        raise MlccError(f"cannot read GGUF adapter {path}: {type(e).__name__}: {e}") from None
    if truncated is not None:
        raise MlccError(f"GGUF adapter is truncated or corrupted: tensor {truncated} is incomplete ({path})")
    if fields.get(gguf.Keys.General.TYPE) != "adapter" or fields.get(gguf.Keys.Adapter.TYPE) != "lora":
        raise MlccError(f"{path} is not a llama.cpp LoRA adapter (general.type adapter, adapter.type lora)")
    alpha = float(fields.get(gguf.Keys.Adapter.LORA_ALPHA) or 0)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        name, _, part = tensor.name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise MlccError(f"{path}: tensor {tensor.name} is not a lora_a/lora_b factor")
        try:
            value = gguf.quants.dequantize(np.asarray(tensor.data), gguf.GGMLQuantizationType(tensor.tensor_type))
        except (NotImplementedError, ValueError):
            raise MlccError(f"{path}: cannot decode {tensor.name} (type {tensor.tensor_type})") from None
        parts.setdefault(name, {})[part] = value.astype(np.float32)
    adapter = Adapter(path, user_scale)
    for name, pair in parts.items():
        a, b = pair.get("lora_a"), pair.get("lora_b")
        if name == "token_embd.weight" and a is not None and b is not None and a.ndim == b.ndim == 2:
            # llama.cpp reads embedding rows out of lora_a ([vocab, r]) and multiplies them by lora_b
            # ([hidden, r]): the change of the [vocab, hidden] table is lora_a @ lora_b.T.
            a, b = b.T, a
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise MlccError(f"{path}: {name} has no matching lora_a/lora_b pair")
        adapter.factors[name] = (a, b, (alpha / a.shape[0] if alpha else 1.0) * user_scale)
    return adapter
