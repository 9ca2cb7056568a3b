"""Loads an artifact with TVM's runtime alone: library, weights, tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm
from safetensors import SafetensorError, safe_open
from tvm.runtime.vm import VirtualMachine

from artifacts import Manifest, MlccError, load_manifest, verify_files
from runtime.tokenizer import Tokenizer

DEVICES = {"cpu": tvm.cpu, "cuda": tvm.cuda, "metal": tvm.metal, "vulkan": tvm.vulkan, "opencl": tvm.opencl}


class LoadedArtifact:
    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.manifest: Manifest = load_manifest(self.path)
        verify_files(self.path, self.manifest, check_hashes=verify)
        device_kind = self.manifest.target["device"]
        if device_kind not in DEVICES:
            raise MlccError(f"unknown device kind in manifest: {device_kind}")
        self.device = DEVICES[device_kind](0)
        if not self.device.exist:
            raise MlccError(f"this artifact needs a {device_kind} device, and none is available")
        try:
            library = tvm.runtime.load_module(str(self.path / self.manifest.library))
        except Exception as e:  # a damaged or foreign library
            raise MlccError(f"cannot load {self.manifest.library}: {str(e).splitlines()[0]}") from None
        self.vm = VirtualMachine(library, self.device)
        self.params = self._load_weights()
        self.tokenizer = Tokenizer(self.path, self.manifest.tokenizer, self.manifest.chat_template)

    def _load_weights(self) -> list[tvm.runtime.Tensor]:
        arrays: dict[str, np.ndarray] = {}
        for shard in self.manifest.weights["shards"]:
            try:
                with safe_open(str(self.path / shard), framework="numpy") as f:
                    arrays.update({name: f.get_tensor(name) for name in f.keys()})
            except (SafetensorError, OSError) as e:
                raise MlccError(f"cannot read weight shard {shard}: {e}") from None
        missing = [n for n in self.manifest.weights["params"] if n not in arrays]
        if missing:
            raise MlccError(f"weight shards lack {len(missing)} parameters (e.g. {missing[0]})")
        return [tvm.runtime.tensor(arrays.pop(name), self.device) for name in self.manifest.weights["params"]]
