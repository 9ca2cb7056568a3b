"""The paged KV cache's bookkeeping and the prefix cache, kept apart from the engine's scheduling.

PagedKV wraps TVM's paged KV-cache object and its builtins: sequences are added, forked at a position (sharing
the parent's whole pages before it) and removed, each model call is bracketed by begin/end, and pages are
counted. PrefixCache keeps finished sequences for their prefixes, least recently used first out, and finds the
one sharing the longest run of whole canonical chunks with a prompt. Which KV may be reused at all (canonical
prefill KV only, of the same rope set) is the engine's design (runtime/engine.py, "Determinism").
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import numpy as np
import tvm
from tvm.runtime import ShapeTuple

_f = tvm.get_global_func
KV_ADD = _f("vm.builtin.kv_state_add_sequence")
KV_REMOVE = _f("vm.builtin.kv_state_remove_sequence")
KV_FORK = _f("vm.builtin.kv_state_fork_sequence")
KV_POP = _f("vm.builtin.kv_state_popn")
KV_BEGIN = _f("vm.builtin.kv_state_begin_forward")
KV_END = _f("vm.builtin.kv_state_end_forward")
KV_FREE_PAGES = _f("vm.builtin.attention_kv_cache_get_num_available_pages")


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two token arrays share."""
    n = min(a.size, b.size)
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PagedKV:
    """TVM's paged KV cache for up to `max_sequences` sequences of `page_size`-token pages; sequence ids are
    handed out here, each used once."""

    def __init__(self, create: Callable[..., Any], max_sequences: int, tokens: int, prefill_chunk: int, page_size: int):
        """`create`: the artifact's create_paged_kv_cache; `prefill_chunk`: the most tokens one prefill call takes."""
        self.page_size = page_size
        self.state = create(
            ShapeTuple([max_sequences]),
            ShapeTuple([tokens]),
            ShapeTuple([prefill_chunk]),
            ShapeTuple([page_size]),
            ShapeTuple([0]),
        )
        self.total_pages = self.free_pages()
        self._seq_ids = itertools.count()

    def add(self) -> int:
        """A new empty sequence's id."""
        seq_id = next(self._seq_ids)
        KV_ADD(self.state, seq_id)
        return seq_id

    def fork(self, parent: int, length: int) -> int:
        """A new sequence holding `parent`'s first `length` tokens: their whole pages are shared, not copied."""
        child = next(self._seq_ids)
        KV_FORK(self.state, parent, child, length)
        return child

    def remove(self, seq_id: int) -> None:
        KV_REMOVE(self.state, seq_id)

    def pop(self, seq_id: int, n: int) -> None:
        """Drop the last `n` tokens of a sequence (drafted tokens that were rejected)."""
        if n:
            KV_POP(self.state, seq_id, n)

    def free_pages(self) -> int:
        return int(KV_FREE_PAGES(self.state))

    @property
    def used_tokens(self) -> int:
        return (self.total_pages - self.free_pages()) * self.page_size

    def pages_needed(self, tokens: int, cached: int) -> int:
        """Pages a sequence of `tokens` owns when its first `cached` tokens are forked from another."""
        base = cached - cached % self.page_size
        return -(-(tokens - base) // self.page_size)

    def forward(
        self, fn: Any, seq_ids: list[int], lengths: list[int], inputs: list[np.ndarray], params: Any, device: Any
    ) -> Any:
        """Call the model function `fn` on `inputs` (copied to `device`) for `lengths` new tokens of each of
        `seq_ids`: its logits (and whatever else it returns before the cache, as a list)."""
        args = [tvm.runtime.tensor(array, device) for array in inputs]
        KV_BEGIN(self.state, ShapeTuple(seq_ids), ShapeTuple(lengths))
        *outputs, self.state = fn(*args, self.state, params)
        KV_END(self.state)
        return outputs[0] if len(outputs) == 1 else outputs


class PrefixCache:
    """Finished sequences kept in `kv` for their prefixes, at most `max_sequences`, least recently used first
    out. Each is kept with its reusable token ids and its kind (what else its KV was computed with: see
    Engine._kv_kind; KV of one kind is not reusable by another); prefixes are shared in whole chunks of `chunk`
    tokens."""

    def __init__(self, kv: PagedKV, max_sequences: int, chunk: int):
        self.kv, self.max_sequences, self.chunk = kv, max_sequences, chunk
        self.sequences: OrderedDict[int, tuple[np.ndarray, Hashable]] = OrderedDict()  # seq id -> (tokens, kind)

    def __len__(self) -> int:
        return len(self.sequences)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self.sequences

    def keep(self, seq_id: int, tokens: np.ndarray, kind: Hashable) -> None:
        """Keep a finished sequence whose first `tokens` may be forked; the oldest go beyond `max_sequences`."""
        self.sequences[seq_id] = (tokens, kind)
        while len(self.sequences) > self.max_sequences:
            self._evict(next(iter(self.sequences)))

    def touch(self, seq_id: int) -> None:
        """Mark a sequence just forked as the most recently used (if it is cached)."""
        if seq_id in self.sequences:
            self.sequences.move_to_end(seq_id)

    def evict_one(self, keep: int | None = None) -> bool:
        """Drop the least recently used cached sequence, `keep` only when it is the last; False if none."""
        victim = next((s for s in self.sequences if s != keep), keep if keep in self.sequences else None)
        if victim is None:
            return False
        self._evict(victim)
        return True

    def _evict(self, seq_id: int) -> None:
        del self.sequences[seq_id]
        self.kv.remove(seq_id)

    def whole_chunks(self, tokens: int) -> int:
        return tokens - tokens % self.chunk

    def longest_prefix(
        self, prompt: np.ndarray, kind: Hashable, running: Iterable[tuple[int, np.ndarray]] = ()
    ) -> tuple[int | None, int]:
        """(sequence id, shared tokens) of the sequence sharing the most whole chunks with `prompt`: a cached one
        of `kind`, or one of `running` ((seq id, reusable tokens) of live sequences); (None, 0) if none.
        On a tie the least recently used cached sequence wins, then the first running one."""
        candidates = itertools.chain(
            ((seq_id, tokens) for seq_id, (tokens, k) in self.sequences.items() if k == kind), running
        )
        best: tuple[int | None, int] = (None, 0)
        for seq_id, tokens in candidates:
            shared = self.whole_chunks(common_prefix(prompt, tokens))
            if shared > best[1]:
                best = (seq_id, shared)
        return best
