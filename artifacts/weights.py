"""Weight shards: safetensors files written tensor by tensor, so conversion never holds the whole model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

SHARD_BYTES = 256 << 20


class ShardWriter:
    """Collects converted tensors and flushes a shard whenever it reaches SHARD_BYTES."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES):
        self.folder = folder
        self.shard_bytes = shard_bytes
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.shards: list[str] = []
        self.index: dict[str, str] = {}  # tensor name -> shard file
        self.aliases: dict[str, str] = {}  # tensor name -> the stored tensor with the same bytes
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        self.pending[name] = np.ascontiguousarray(array)
        self.pending_bytes += array.nbytes
        self.total_bytes += array.nbytes
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def alias(self, name: str, stored: str) -> None:
        """`name` is `stored` byte for byte: kept once, in the shards and in memory."""
        self.aliases[name] = stored

    def flush(self) -> None:
        if not self.pending:
            return
        shard = f"weights-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(self.folder / shard))
        self.shards.append(shard)
        self.index.update(dict.fromkeys(self.pending, shard))
        self.pending, self.pending_bytes = {}, 0
