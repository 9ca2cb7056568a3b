"""X-LoRA (PEFT's XLoraModel): a mixture of LoRA experts whose mix a small classifier picks for every token.

PEFT runs each forward twice: a scaling pass (the adapters scaled by `scaling_pass_value`, 0 by default: the base
model), whose final hidden states (after the final norm) go through the classifier, and the real pass, where each
adapted module adds its adapters' LoRA outputs weighted by the classifier's scalings for that token (and that
module, with layerwise scalings). Both passes are causal, so the engine keeps two KV sequences per request, the
scaling pass's and the real one's, and runs them one after the other (runtime/engine.py); the adapters sit in the
artifact's adapter slots and the scalings reach them as rows of the library's `lora_scalings` input
(compiler/lora_slots.py).

The folder is what `PeftModel.save_pretrained` writes for an X-LoRA model: `adapter_config.json` (peft_type XLORA),
`adapter_model.safetensors` (the classifier, `base_model.internal_xlora_classifier.layers.<i>`), and the LoRA
experts in subfolders named like the config's `adapters`, in its order (expert i is the classifier's class i; PEFT
applies only experts named by their index, "0", "1", ..., and saves them in such folders).

PEFT 0.21's save_pretrained of an X-LoRA model loses data: it leaves out every tensor whose name has `.j.` for
another expert j, which drops layer j from expert i's file (saved with copies of the base weights) and layer j of
a deeper classifier. Such folders are refused in one line; `tests/test_xlora.py` writes complete ones.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from artifacts.errors import MlccError
from artifacts.lora_formats import Adapter

CONFIG_FILE = "adapter_config.json"
CLASSIFIER_FILE = "adapter_model.safetensors"
CLASSIFIER_KEY = re.compile(r"(?:base_model\.)?internal_xlora_classifier\.layers\.(\d+)\.(weight|bias)")


def is_xlora_folder(path: str | Path) -> bool:
    """Whether `path` is a saved X-LoRA model (rather than a plain LoRA adapter)."""
    config = Path(path).expanduser() / CONFIG_FILE
    try:
        return str(json.loads(config.read_text()).get("peft_type", "")).upper() == "XLORA"
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class XLora:
    """A loaded X-LoRA model: its classifier and settings, and where its experts sit in the slots."""

    path: Path
    experts: list[Path]  # the LoRA experts' folders, in class order
    classifier: list[tuple[np.ndarray, np.ndarray]]  # (weight [out, in], bias [out]); ReLU between them
    layerwise: bool
    softmax: bool
    temperature: float
    top_k: int | None
    softmax_top_k: bool
    scaling_pass_value: float
    global_weight: float
    slots: list[int] = field(default_factory=list)  # expert i's adapter slot
    modules: list[int] = field(default_factory=list)  # PEFT's layer_number -> the artifact's module index

    @property
    def classes(self) -> int:
        return len(self.experts)

    def scalings(self, hidden: np.ndarray, table_shape: tuple[int, int]) -> np.ndarray:
        """The real pass's rows of `lora_scalings` [tokens, modules, slots] for the scaling pass's final hidden
        states `hidden` [tokens, h]."""
        x = hidden.astype(np.float32)
        for i, (weight, bias) in enumerate(self.classifier):
            x = x @ weight.T + bias
            if i < len(self.classifier) - 1:
                x = np.maximum(x, 0)
        tokens, layers = x.shape[0], len(self.modules)
        if self.layerwise:  # [t, layers * classes]
            logits = x.reshape(tokens, layers, self.classes)
        else:  # [t, classes], the same for every layer
            logits = np.broadcast_to(x[:, None, :], (tokens, layers, self.classes))
        if self.softmax:
            logits = _softmax(logits / np.float32(self.temperature))
        return self._rows(logits, table_shape)

    def pass_scalings(self, tokens: int, table_shape: tuple[int, int]) -> np.ndarray | None:
        """The scaling pass's rows [tokens, modules, slots], or None when it is the base model (value 0)."""
        if self.scaling_pass_value == 0:
            return None
        value = np.full((tokens, len(self.modules), self.classes), self.scaling_pass_value, np.float32)
        return self._rows(value, table_shape)

    def _rows(self, scalings: np.ndarray, table_shape: tuple[int, int]) -> np.ndarray:
        """Scalings [t, layers, classes] after PEFT's per-module top-k and its softmax, times the global weight,
        placed at the experts' modules and slots of a table row [t, modules, slots]."""
        scalings = np.array(scalings, np.float32)
        if self.top_k is not None:  # keep the k largest (ties: the lower class, as a stable sort)
            order = np.argsort(-scalings, axis=-1, kind="stable")
            keep = np.zeros(scalings.shape, bool)
            np.put_along_axis(keep, order[..., : self.top_k], True, axis=-1)
            scalings = np.where(keep, scalings, np.float32(0))
        if self.softmax_top_k:  # a softmax over the nonzero scalings; the rest stay 0
            nonzero = scalings != 0
            with np.errstate(invalid="ignore"):  # a row of zeros stays zeros, as in PEFT
                scalings = np.where(nonzero, _softmax(np.where(nonzero, scalings, -np.inf)), np.float32(0))
        rows = np.zeros((scalings.shape[0], *table_shape), np.float32)
        modules, slots = np.array(self.modules)[:, None], np.array(self.slots)[None, :]
        rows[:, modules, slots] = scalings * np.float32(self.global_weight)
        return rows


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def read_xlora(path: str | Path, hidden_size: int) -> XLora:
    """Read a saved X-LoRA model (its experts are read by the caller, from `experts`); one-line errors."""
    folder = Path(path).expanduser()
    try:
        config: dict[str, Any] = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise MlccError(f"invalid {CONFIG_FILE} in {folder}: {e}") from None
    adapters = config.get("adapters") if isinstance(config, dict) else None
    if not isinstance(adapters, dict) or not adapters:
        raise MlccError(f"{folder}: an X-LoRA config must name its adapters")
    # expert i's folder: named like the expert (a plain name inside the folder), else by its index
    named = [re.fullmatch(r"[\w-][\w.-]*", name) and (folder / name).is_dir() for name in adapters]
    experts = [folder / name if ok else folder / str(i) for i, (name, ok) in enumerate(zip(adapters, named))]
    missing = [e.name for e in experts if not (e / CONFIG_FILE).is_file()]
    if missing:
        raise MlccError(f"{folder}: the X-LoRA expert folder {missing[0]!r} is missing (PEFT saves expert i in i/)")
    try:
        with safe_open(str(folder / CLASSIFIER_FILE), framework="numpy") as f:
            tensors = {key: f.get_tensor(key).astype(np.float32) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise MlccError(f"cannot read the X-LoRA classifier {folder / CLASSIFIER_FILE}: {e}") from None
    parts: dict[int, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = CLASSIFIER_KEY.fullmatch(key)
        if match is None:
            raise MlccError(f"{folder}: unexpected tensor {key} in the X-LoRA classifier")
        parts.setdefault(int(match[1]), {})[match[2]] = value
    classifier = [(p.get("weight"), p.get("bias")) for _, p in sorted(parts.items())]
    try:
        settings = _settings(config, len(experts))
    except (TypeError, ValueError) as e:
        raise MlccError(f"{folder}: invalid X-LoRA setting: {e}") from None
    depth = settings.pop("depth")
    if len(classifier) != depth:
        raise MlccError(
            f"{folder}: the X-LoRA classifier has {len(classifier)} of its {depth} linear layers (PEFT 0.21 loses "
            "tensors whose names contain an expert's name when it saves an X-LoRA model)"
        )
    width = hidden_size
    for i, (weight, bias) in enumerate(classifier):
        if (
            weight is None
            or bias is None
            or weight.ndim != 2
            or weight.shape[1] != width
            or bias.shape != weight.shape[:1]
        ):
            raise MlccError(
                f"{folder}: X-LoRA classifier layer {i} does not fit (the model's hidden size is {hidden_size})"
            )
        width = weight.shape[0]
    return XLora(folder, experts, classifier, **settings)  # type: ignore[arg-type]


def _settings(config: dict[str, Any], experts: int) -> dict[str, Any]:
    """XLoraConfig's settings with PEFT's defaults; ValueError for values PEFT could not run with."""
    top_k = config.get("top_k_lora")
    settings = dict(
        depth=int(config.get("xlora_depth", 1)),
        layerwise=bool(config.get("layerwise_scalings", False)),
        softmax=bool(config.get("enable_softmax", True)),
        temperature=float(config.get("softmax_temperature", 1.0)),
        top_k=None if top_k is None else int(top_k),
        softmax_top_k=bool(config.get("enable_softmax_topk", False)),
        scaling_pass_value=float(config.get("scaling_pass_value", 0.0)),
        global_weight=float(config.get("global_scaling_weight", 1.0)),
    )
    if not settings["temperature"] > 0:
        raise ValueError("softmax_temperature must be positive")
    if top_k is not None and not 1 <= settings["top_k"] <= experts:
        raise ValueError(f"top_k_lora must be in 1..{experts}")
    if settings["depth"] < 1:
        raise ValueError("xlora_depth must be at least 1")
    return settings


def check_classifier_width(xlora: XLora) -> None:
    """The classifier's output must give one scaling per expert (per adapted module, with layerwise scalings)."""
    outputs = xlora.classifier[-1][0].shape[0]
    expected = xlora.classes * (len(xlora.modules) if xlora.layerwise else 1)
    if outputs != expected:
        per = f" for each of the {len(xlora.modules)} adapted modules" if xlora.layerwise else ""
        raise MlccError(f"{xlora.path}: the X-LoRA classifier gives {outputs} scalings, not {xlora.classes}{per}")


def expert_factors(adapter: Adapter, num_layers: int) -> Adapter:
    """An expert's LoRA factors, without the base weights PEFT 0.21 saves along (see the module docstring); an
    expert whose file lost a layer is refused."""
    if adapter.replacements:  # the base copies: every layer of the model should be there
        named = [*adapter.replacements, *adapter.factors]
        layers = {int(m[1]) for m in (re.search(r"\.(\d+)\.", name) for name in named) if m}
        lost = sorted(set(range(num_layers)) - layers)
        if lost:
            raise MlccError(
                f"{adapter.path}: this X-LoRA expert has no tensors of layer {lost[0]} (PEFT 0.21 loses tensors whose "
                "names contain another expert's name when it saves an X-LoRA model)"
            )
        adapter.replacements.clear()
    return adapter
