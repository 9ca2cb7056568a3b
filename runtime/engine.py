"""The engine: a paged KV cache, continuous batching, prefix caching, sampling, stop conditions, streaming.

Requests wait in a queue. Each step admits waiting requests while batch slots and KV pages allow, prefills
at most `prefill_chunk` prompt tokens of the admitted requests that are not yet fully prefilled (several
prompts concatenated into one ragged batch, oldest first; a prompt longer than that continues next step),
and decodes one token for every fully prefilled request in a single batched call. So a long prompt delays
the running requests' next tokens by one chunk per step, not by its whole prefill.

Admission needs free KV pages for the prompt a request has to prefill plus one page of output, and reserves
the prompt's; decoding takes pages as it goes. When a decode step needs pages that are not free, cached
prefixes are evicted first, then the newest running requests are preempted: their KV is dropped and they go
back to the front of the queue, to be recomputed later from their prompt and the tokens they have generated
(their text, sampler state and penalties carry on as if nothing happened).

Prefix caching: a finished request's sequence stays in the KV cache (least recently used first out, when
pages or slots are needed). A new prompt that shares a prefix with a cached or running sequence forks it
and prefills only the rest. A LongRoPE model rotates a whole prompt with the factors its length selects, so
its prefixes are shared only between prompts on the same side of that switch; and prefixes are shared only
between requests with the same LoRA adapter (runtime/adapters.py). The pages and the cached
sequences are kept by runtime/kv_cache.py (PagedKV, PrefixCache); what may be reused is decided here.

X-LoRA (runtime/xlora.py): a request of an X-LoRA model holds two KV sequences, its scaling pass's and its own,
and takes twice the pages. Every call over its tokens (prefill chunk or decode) runs the scaling pass's sequence
first, in a call of its own; the classifier turns that call's final hidden states into the tokens' scalings, and
the request's own sequence then takes the same tokens with them, in the call with the other requests. Its
sequences are neither forked from nor kept for the prefix cache.

Determinism: at temperature 0 a request's tokens and logits are bit-identical whether or not its prefix is
cached, however the engine's steps chunk its prompt, and whatever else is in the batch. Attention over a
prompt is computed in parts that TVM's cache merges (the new tokens among themselves, then the cached pages
in up to two depths of its block tree), and each split rounds differently; so the engine makes the split a
function of the positions alone. Prompts are prefilled in canonical chunks (CANONICAL_CHUNK tokens, aligned
to position 0; one call never crosses a boundary of a sequence's chunk), every sequence's first chunk is its
own block of the tree (depth 0; the rest is depth 1), and a cached prefix is reused only up to a chunk
boundary and only where its KV came from such a prefill (not from decoding). Fresh or forked, a token then
attends to the same keys in the same parts. A request preempted when the KV cache is full is recomputed the
same way: its prompt by canonical prefill, its generated tokens replayed one decode step each (slower than one
prefill, but bit-identical to how they were first computed).

Structured output: a constrained request carries a matcher (runtime/constraints.py) whose token mask is
applied to its logits before sampling. The masks of a step's constrained requests are computed in a helper
thread while the model runs, and free requests sample exactly as they would alone.
"""

from __future__ import annotations

import gc
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from artifacts import Manifest, MlccError
from runtime.adapters import AdapterSlots, Mix
from runtime.artifact import LoadedArtifact
from runtime.constraints import ConstraintCompiler, apply_mask, check, check_mask, compute_mask, compute_masks
from runtime.kv_cache import PagedKV, PrefixCache, common_prefix
from runtime.sampler import SamplingParams, TokenLogprob, adjust_logits, sample, token_logprob
from runtime.speculative import MAX_DRAFT_TOKENS, Draft, DraftModel, PromptLookup, choose
from runtime.tokenizer import IncrementalDecoder
from runtime.xlora import XLora

DEFAULT_KV_BYTES = 2 << 30
# Prompt tokens per canonical prefill chunk (see the module docstring): also the granularity of prefix reuse.
# Small-context models use less (a quarter of the artifact's prefill chunk, in whole pages).
# Smaller reuses more of a cached prefix; larger prefills long prompts in fewer calls (measured on SmolLM2,
# 511 tokens: 128 costs ~7% over one call).
CANONICAL_CHUNK = 128


def set_threads(n: int) -> None:
    """Size TVM's CPU thread pool (it otherwise guesses, and on small VMs guesses one).

    The pool is per thread: call this again in any thread that runs the model.
    """
    os.environ["TVM_NUM_THREADS"] = str(n)
    tvm.get_global_func("runtime.config_threadpool")(-3, n)  # -3: n threads sharing all cores


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length", "abort" or "error"
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for
    error: str | None = None  # why it ended, when finish_reason is "error"


@dataclass
class Delta:
    """What a request produced since its previous delta; its last delta carries the finish reason."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    error: str | None = None  # set on the last delta of a request that failed on its own


@dataclass(eq=False)
class Request:
    """One completion in flight. Only the engine's thread may touch it until `finish_reason` is set."""

    prompt_ids: list[int]
    params: SamplingParams
    on_delta: Callable[[Delta], None] | None
    rng: np.random.Generator
    decoder: IncrementalDecoder
    arrival: int = 0  # enqueue order: the newest running request is preempted first
    seq_id: int = -1
    kv_len: int = 0  # tokens of this sequence in the KV cache
    prefill_len: int = 0  # tokens the sequence must hold before it samples from prefill logits
    fork_base: int = 0  # first position of the first KV page this sequence owns (others are shared)
    canonical_len: int = 0  # leading positions whose KV came from canonical prefill chunks (reusable)
    cached_tokens: int = 0
    preemptions: int = 0  # times its KV was dropped to free pages (then recomputed)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    matcher: Any = None  # llguidance's LLMatcher of a constrained request, at the tokens generated so far
    mask: np.ndarray | None = None  # the matcher's mask for the next token, once computed
    adapter: int = -1  # the adapter slot it runs with (-1: the base model); see runtime/adapters.py
    xlora: XLora | None = None  # its X-LoRA model, if any (then `adapter` is -1)
    scaling_seq_id: int = -1  # an X-LoRA request's second KV sequence: its scaling pass (see the module docstring)
    draft_limit: int = 0  # speculative decoding: the most tokens to draft next step (0: the engine's setting)

    @property
    def budget(self) -> int:
        """The most tokens this sequence can ever hold."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def prefilling(self) -> bool:
        return self.kv_len < self.prefill_len

    @property
    def kv_copies(self) -> int:
        """KV sequences it holds, all of the same length."""
        return 2 if self.xlora is not None else 1

    @property
    def seq_ids(self) -> list[int]:
        return [self.seq_id] if self.xlora is None else [self.seq_id, self.scaling_seq_id]

    def all_ids(self) -> list[int]:
        """Prompt and generated tokens: what a recomputed sequence puts back into its KV."""
        return self.prompt_ids + self.output_ids

    def num_ids(self) -> int:
        """len(all_ids()), without the copy each decode step would make of a long context."""
        return len(self.prompt_ids) + len(self.output_ids)

    def id_at(self, i: int) -> int:
        """all_ids()[i] (0 <= i < num_ids()), likewise."""
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def reusable_ids(self) -> list[int]:
        """The tokens whose KV another request may fork (see the module docstring)."""
        return self.all_ids()[: self.canonical_len]

    def result(self) -> Result:
        return Result(
            self.text,
            list(self.output_ids),
            self.finish_reason or "length",
            len(self.prompt_ids),
            self.cached_tokens,
            list(self.logprobs) if self.params.logprobs else None,
            self.error,
        )


def logit_positions(
    ends: np.ndarray, every_position: bool, wanted: list[bool] | None, at_least_one: bool
) -> np.ndarray:
    """The rows of a ragged prefill whose logits are computed: every token's, or the last token of each sequence
    `wanted` marks (sequences end at `ends`); `at_least_one`: the last token's when none is wanted."""
    if every_position:
        return np.arange(ends[-1], dtype="int32")
    positions = (ends - 1)[np.asarray(wanted, bool)].astype("int32")
    return positions if positions.size or not at_least_one else (ends[-1:] - 1).astype("int32")


class Engine:
    """Runs an artifact. `generate`, `stream` and `chat` are the Python API the CLI uses.

    Not thread-safe: drive it from one thread (`runtime.ServingEngine` does that for threads and asyncio).
    """

    def __init__(
        self,
        artifact: str | Path,
        max_batch_size: int | None = None,
        kv_cache_tokens: int | None = None,
        verify: bool = True,
        threads: int | None = None,
        prefix_cache: bool = True,
        prefill_chunk: int | None = None,
        adapters: dict[str, str | Path] | None = None,
        draft: str | Path | None = None,
        prompt_lookup: bool = False,
        draft_tokens: int = 4,
    ):
        """`prefill_chunk`: prompt tokens prefilled per step (default and maximum: the artifact's chunk size;
        at least one canonical chunk of one prompt goes in every step); smaller keeps running requests'
        inter-token latency lower while long prompts arrive. `adapters`: name -> LoRA adapter (a PEFT folder, or a
        llama.cpp .gguf file for an artifact compiled from GGUF, or a PEFT X-LoRA model's folder: a slot per expert),
        loaded into the artifact's adapter slots (`mlcc compile --lora-slots`); requests pick one by name.
        Speculative decoding (runtime/speculative.py): `draft`, a draft model's artifact (same tokenizer), or
        `prompt_lookup`, n-gram drafts from each request's own tokens, proposing up to `draft_tokens` per step."""
        self.threads = threads or os.cpu_count() or 1
        set_threads(self.threads)
        self.artifact = LoadedArtifact(artifact, verify=verify)
        m = self.artifact.manifest
        self.tokenizer = self.artifact.tokenizer
        self.vocab_size = m.model_config.get("vocab_size") or self.tokenizer.tok.get_vocab_size()
        self.context_window = m.context_window
        self.max_batch_size = max_batch_size or m.kv_cache["max_batch_size"]
        # A kernel over a tensor with no rows is a launch with no blocks, which the GPU refuses: prefill chunks
        # that end no prompt still compute one row of logits there (the CPU skips the output head).
        self.some_logits_always = m.target["device"] != "cpu"
        self.kernel_prefill_chunk = m.kv_cache["prefill_chunk_size"]  # the most tokens one prefill call takes
        self.prefill_chunk = prefill_chunk or self.kernel_prefill_chunk
        if not 1 <= self.prefill_chunk <= self.kernel_prefill_chunk:
            raise MlccError(f"prefill_chunk must be in 1..{self.kernel_prefill_chunk} (the artifact's chunk size)")
        self.page_size = m.kv_cache["page_size"]
        # Whole pages, and a quarter of a prefill call, so that small-context models reuse prefixes too. The quarter
        # rounds up: a chunk held below a 512-token sliding window (511) gets 128, not 112, which would split a
        # 128-token prompt into two calls, each reading all the weights.
        quarter = -(-self.kernel_prefill_chunk // 4) // self.page_size * self.page_size
        self.canonical_chunk = min(max(self.page_size, min(CANONICAL_CHUNK, quarter)), self.kernel_prefill_chunk)
        self.kv_tokens = kv_cache_tokens or self._default_kv_tokens(m)
        self.kv = PagedKV(
            self.artifact.vm["create_paged_kv_cache"],
            self.max_batch_size,
            self.kv_tokens,
            self.kernel_prefill_chunk,
            self.page_size,
        )
        self._prefill = self.artifact.vm["batch_prefill"]
        self._decode = self.artifact.vm["batch_decode"]
        self._params = self.artifact.params
        self.adapters = AdapterSlots(
            m.lora_slots, m.weights["params"], self._params, self.artifact.device, m.model_config
        )
        for name, path in (adapters or {}).items():
            self.adapters.load(name, path)
        self._arrivals = itertools.count()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # TVM's forked (cascade) attention ignores sliding windows: those models never fork a sequence.
        self.can_fork = not m.kv_cache.get("sliding_window")
        self.prefix_cache = prefix_cache and self.can_fork
        # LongRoPE: prompts longer than this are rotated with other factors, so prefill passes prompt lengths
        # and a prefix is reused only between prompts on the same side of it (0: no such model). Likewise
        # only between requests of the same adapter.
        self.rope_switch_length = int(m.kv_cache.get("rope_switch_length") or 0)
        # Finished sequences kept for their prefixes.
        self.cached = PrefixCache(self.kv, 4 * self.max_batch_size, self.canonical_chunk)
        self.constraints = ConstraintCompiler(self.tokenizer, self.vocab_size)
        self._mask_pool: ThreadPoolExecutor | None = None  # the helper thread, made on first use
        self._mask_executor: Any = None  # llguidance's LLExecutor, likewise
        self._masks_pending: Future | None = None
        self.draft_tokens = draft_tokens
        self.drafter = self._make_drafter(draft, prompt_lookup, verify)
        self.counters = {
            "requests": 0,
            "prompt_tokens": 0,
            "cached_tokens": 0,
            "generated_tokens": 0,
            "aborted": 0,
            "preemptions": 0,
            "drafted_tokens": 0,  # speculative decoding: tokens proposed, and those the target kept
            "accepted_tokens": 0,
        }
        # What is loaded stays: out of the collector's full scans, which a decode step's garbage triggers and
        # which walked every object of TVM, torch and the tokenizer (~240,000; `perf` of SmolLM2's decode at 1
        # thread: the interpreter 8.1% -> 5.1% of samples, gc_collect_main's 2.3% gone).
        gc.collect()
        gc.freeze()

    def _make_drafter(
        self, draft: str | Path | None, prompt_lookup: bool, verify: bool
    ) -> DraftModel | PromptLookup | None:
        if draft is None and not prompt_lookup:
            return None
        if draft is not None and prompt_lookup:
            raise MlccError("choose one drafter: a draft model or prompt lookup")
        limit = min(MAX_DRAFT_TOKENS, self.kernel_prefill_chunk - 1)  # a verify call takes the drafts and one more
        if not 1 <= self.draft_tokens <= limit:
            raise MlccError(f"draft tokens must be in 1..{limit}")
        if draft is None:
            return PromptLookup()
        return DraftModel(draft, self.artifact, self.max_batch_size, self.kv_tokens, verify)

    # ---- public API ---------------------------------------------------------------------------------
    def generate(
        self, prompts: str | list[str], params: SamplingParams | None = None, raw: bool = True
    ) -> list[Result]:
        """Complete each prompt (params.n times each, prompt-major); all of them run together."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return self.generate_ids([self._encode(p, raw) for p in prompts], params)

    def generate_ids(
        self, prompt_ids: list[list[int]], params: SamplingParams | None = None, adapter: str | None = None
    ) -> list[Result]:
        params = params or SamplingParams()
        requests = [r for ids in prompt_ids for r in self.make_requests(list(ids), params, adapter=adapter)]
        self.enqueue(requests)
        while any(r.finish_reason is None for r in requests):
            self.step()
        return [r.result() for r in requests]

    def stream(self, prompt: str, params: SamplingParams | None = None, raw: bool = True) -> Iterator[str]:
        """Text pieces as they are generated."""
        return self._stream(self._encode(prompt, raw), params)

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> Iterator[str]:
        """Streams the assistant's reply to a conversation, rendered with the model's chat template."""
        return self._stream(self.tokenizer.encode_chat(messages), params)

    def load_adapter(self, name: str, path: str | Path, scale: float = 1.0) -> None:
        """Load a LoRA adapter (see `adapters` in __init__) into a free adapter slot (an X-LoRA model into one per
        expert); requests then pick it by `name`."""
        self.adapters.load(name, path, scale)

    def prefill_logits(self, prompt_ids: list[list[int]], adapter: str | None = None) -> np.ndarray:
        """Last-token logits [batch, vocab] of fresh sequences prefilled together as requests' prompts are (so
        equal to a request's first-token logits); leaves no state."""
        return np.stack([rows[0] for rows in self._prefill_fresh(prompt_ids, False, adapter)])

    def prompt_logits(self, ids: list[int], adapter: str | None = None) -> np.ndarray:
        """Logits [len(ids), vocab] at every position of one fresh sequence (for perplexity and references),
        prefilled as a request's prompt is; leaves no state."""
        return np.concatenate(self._prefill_fresh([ids], True, adapter)[0])

    def _prefill_fresh(
        self, prompt_ids: list[list[int]], every_position: bool, adapter: str | None = None
    ) -> list[list[np.ndarray]]:
        """Per prompt, the logits of fresh sequences' prefill: with `every_position`, each call's [tokens, vocab],
        else its last token's alone; the sequences are removed afterwards."""
        params = SamplingParams(max_tokens=1)
        requests = [self.make_requests(list(ids), params, adapter=adapter)[0] for ids in prompt_ids]
        self._make_room(sum(self.kv.pages_needed(len(r.prompt_ids), 0) * r.kv_copies for r in requests))
        for r in requests:
            self._add_sequences(r)
            r.prefill_len = len(r.prompt_ids)
        rows: dict[Request, list[np.ndarray]] = {r: [] for r in requests}
        try:
            while any(r.prefilling for r in requests):
                pending = [r for r in requests if r.prefilling]
                for r, logits in self._prefill_call(pending, self.kernel_prefill_chunk, every_position):
                    rows[r].append(logits)
            return [rows[r] for r in requests]
        finally:
            for r in requests:
                self._remove_sequences(r)

    def self_check(self) -> None:
        """Run the model once on a one-token prompt; a model that cannot run (e.g. weights that do not fit
        its config) raises a one-line MlccError here rather than failing every request later."""
        try:
            logits = self.prefill_logits([[0]])
        except Exception as e:
            raise MlccError(f"the model cannot run: {type(e).__name__}: {str(e).strip().splitlines()[-1]}") from None
        if not np.isfinite(logits).all():
            raise MlccError("the model cannot run: it produced non-finite logits")

    def _default_kv_tokens(self, m: Manifest) -> int:
        """A full context for every batch slot, but no more than DEFAULT_KV_BYTES of K/V (a 32k-context model
        would otherwise reserve ~10 GB), and never less than one full-length sequence."""
        cfg = m.model_config
        itemsize = np.dtype(m.kv_cache["dtype"]).itemsize
        per_token = 2 * cfg["num_layers"] * cfg["num_kv_heads"] * cfg["head_dim"] * itemsize  # K and V
        budget = max(self.context_window, DEFAULT_KV_BYTES // per_token)
        return min(self.context_window * self.max_batch_size, budget)

    def make_requests(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_delta: Callable[[Delta], None] | None = None,
        adapter: str | None = None,
    ) -> list[Request]:
        """Checked requests for `params.n` completions of one prompt, with the adapter named `adapter` (None: the
        base model); touches no engine state (any thread)."""
        params.validate(self.vocab_size)
        xlora = self.adapters.xlora(adapter)
        slot = -1 if xlora is not None else self.adapters.slot(adapter)
        n = len(prompt_ids)
        if n == 0:
            raise MlccError("the prompt is empty")
        if n >= self.context_window:
            raise MlccError(f"the prompt has {n} tokens; the context window is {self.context_window}")
        if not 0 <= min(prompt_ids) <= max(prompt_ids) < self.vocab_size:
            raise MlccError(f"prompt token ids must be in 0..{self.vocab_size - 1}")
        # Never let a sequence outgrow the context window.
        capped = SamplingParams(**{**vars(params), "max_tokens": min(params.max_tokens, self.context_window - n)})
        if self.kv.pages_needed(n + capped.max_tokens, 0) * (2 if xlora else 1) > self.kv.total_pages:
            raise MlccError(
                f"a request needing {n + capped.max_tokens} tokens does not fit the KV cache ({self.kv_tokens})"
            )
        constraint = params.constraint
        matcher = self.constraints.matcher(constraint) if constraint is not None else None
        return [
            Request(
                prompt_ids,
                capped,
                on_delta,
                self._rng(params.seed, i),
                IncrementalDecoder(self.tokenizer, prompt_ids),
                matcher=matcher.deep_copy() if matcher is not None and i else matcher,
                adapter=slot,
                xlora=xlora,
            )
            for i in range(params.n)
        ]

    def enqueue(self, requests: list[Request]) -> None:
        for r in requests:
            r.arrival = next(self._arrivals)
        self.waiting.extend(requests)

    def abort(self, request: Request) -> None:
        """Stop a request now and free its KV sequence; it finishes with reason "abort"."""
        if request.finish_reason is not None:
            return
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.running:
            self.running.remove(request)
            self._remove_sequences(request)
        request.finish_reason = "abort"
        self.counters["aborted"] += 1
        self._emit(request, final=True)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_tokens_used(self) -> int:
        return self.kv.used_tokens

    def step(self) -> None:
        """Free pages for this step's decode (evicting, then preempting), admit what fits, prefill one chunk of
        pending prompt tokens, and decode one token for every request that was fully prefilled before this step
        (so neither new arrivals nor long prompts make the running ones skip a step)."""
        self._make_decode_room()
        self._admit()
        decoding = [r for r in self.running if not r.prefilling]
        prefilling = sorted((r for r in self.running if r.prefilling), key=lambda r: r.arrival)
        speculating = self._drafts(decoding) if self.drafter is not None else []
        drafted = {id(r) for r, _ in speculating}
        decoding = [r for r in decoding if id(r) not in drafted]
        self._start_masks()
        try:
            if prefilling:
                for r, row in self._prefill_call(prefilling, self.prefill_chunk):
                    self._accept_or_fail(r, row)
            if decoding:
                # the next token each sequence has not yet in its KV: its last output, or one being replayed
                ids = [np.array([r.id_at(r.kv_len)], dtype="int32") for r in decoding]
                logits = self._model_call(False, decoding, ids)
                for r, row in zip(decoding, logits):
                    r.kv_len += 1
                    if r.kv_len == r.num_ids():
                        self._accept_or_fail(r, row)
            if speculating:
                self._verify(speculating)
        finally:
            self._await_masks()  # no helper-thread work outlives the step
        self.running = [r for r in self.running if r.finish_reason is None]

    # ---- admission and the prefix cache -------------------------------------------------------------
    @staticmethod
    def _rng(seed: int | None, index: int) -> np.random.Generator:
        """Completion 0 of a seeded request samples as a lone request with that seed would."""
        if seed is None:
            return np.random.default_rng()
        seed %= 2**64  # negative seeds (e.g. -1) are valid 64-bit seeds too
        return np.random.default_rng(seed if index == 0 else [seed, index])

    def _spare_pages(self) -> int:
        """Free pages beyond the rest of the running requests' prompts and their next decoded token."""
        claimed = sum(
            (
                self.kv.pages_needed(r.prefill_len if r.prefilling else r.kv_len + 1, r.fork_base)
                - self.kv.pages_needed(r.kv_len, r.fork_base)
            )
            * r.kv_copies
            for r in self.running
        )
        return self.kv.free_pages() - claimed

    def _admission_pages(self, r: Request, shared: int) -> int:
        """Pages `r` needs to start: what it prefills plus a page of output (no more than it can ever hold)."""
        return self.kv.pages_needed(min(r.num_ids() + self.page_size, r.budget), shared) * r.kv_copies

    def _longest_prefix(self, r: Request) -> tuple[int | None, int]:
        """(sequence id, shared tokens) of the best sequence to fork: shared tokens are whole canonical chunks of
        its reusable KV, and at least one prompt token stays to prefill."""
        if not self.prefix_cache or r.xlora is not None:
            return None, 0
        kind = self._kv_kind(r)
        running = [(a.seq_id, np.asarray(a.reusable_ids())) for a in self.running if self._kv_kind(a) == kind]
        return self.cached.longest_prefix(np.asarray(r.prompt_ids[:-1]), kind, running)

    def _kv_kind(self, r: Request) -> tuple[bool, int, str]:
        """What a sequence's KV was computed with besides its tokens: LongRoPE's factor set (long or short) and
        the adapter or X-LoRA model. Prefixes are shared only between sequences of one kind."""
        return 0 < self.rope_switch_length < len(r.prompt_ids), r.adapter, str(r.xlora.path) if r.xlora else ""

    def _make_room(self, pages: int) -> None:
        while self._spare_pages() < pages:
            if not self.cached.evict_one():
                raise MlccError(f"{pages} KV pages are needed and only {self._spare_pages()} are free")

    def _make_decode_room(self) -> None:
        """Evict cached sequences, then preempt the newest running requests, until this step's decode fits."""
        while self._spare_pages() < 0:
            if not self.cached.evict_one():
                self._preempt(max(self.running, key=lambda r: r.arrival))

    def _preempt(self, r: Request) -> None:
        """Drop `r`'s KV and queue it first, to be recomputed: its prompt by prefill, then its generated tokens
        replayed by decode steps, as they were first computed (so its later tokens are what they would have been)."""
        self.running.remove(r)
        self._remove_sequences(r)
        r.kv_len, r.canonical_len, r.prefill_len = 0, 0, 0
        r.preemptions += 1
        self.counters["preemptions"] += 1
        self.waiting.appendleft(r)

    def _admit(self) -> None:
        """Start waiting requests, in order, while batch slots and KV pages allow."""
        while self.waiting and len(self.running) < self.max_batch_size:
            r = self.waiting[0]
            placement = self._place(r)
            if placement is None:
                break
            parent, shared = placement
            if self._shares_more_later(r, shared):
                break  # fork that prompt once it is prefilled instead of prefilling the same tokens twice
            self.waiting.popleft()
            self._start_sequence(r, parent, shared)
            self.running.append(r)
        if not self.running and self.waiting:
            raise MlccError(f"a request needing {self.waiting[0].budget} tokens does not fit the KV cache")

    def _place(self, r: Request) -> tuple[int | None, int] | None:
        """(sequence to fork or None, shared tokens) for `r`, evicting cached sequences to fit; None if it can't."""
        parent, shared = self._longest_prefix(r)
        while self._spare_pages() < self._admission_pages(r, shared):
            if not self.cached.evict_one(keep=parent):
                return None
            parent, shared = self._longest_prefix(r)
        return parent, shared

    def _shares_more_later(self, r: Request, shared: int) -> bool:
        """Whether `r` shares a longer prefix with a prompt still being prefilled than with any sequence now."""
        if not self.prefix_cache or r.xlora is not None:
            return False
        tokens = np.asarray(r.prompt_ids[:-1])
        kind = self._kv_kind(r)
        longest = max(
            (
                common_prefix(tokens, np.asarray(a.all_ids()[: a.prefill_len]))
                for a in self.running
                if a.prefilling and self._kv_kind(a) == kind
            ),
            default=0,
        )
        return self.cached.whole_chunks(longest) > shared

    def _start_sequence(self, r: Request, parent: int | None, shared: int) -> None:
        if parent is None:
            self._add_sequences(r)
        else:
            r.seq_id = self.kv.fork(parent, shared)
            self.cached.touch(parent)
        r.kv_len, r.canonical_len, r.prefill_len = shared, shared, len(r.prompt_ids)
        r.fork_base = shared - shared % self.page_size
        if r.preemptions:  # a recomputation: the request was counted when it first started
            return
        r.cached_tokens = shared
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(r.prompt_ids)
        self.counters["cached_tokens"] += shared

    def _release(self, r: Request) -> None:
        """Keep a finished sequence for its prefix, or drop it (always, when the request failed)."""
        reusable = self.prefix_cache and r.error is None and r.canonical_len >= self.canonical_chunk
        if not reusable or r.xlora is not None:  # an X-LoRA request's pair of sequences is never kept
            self._remove_sequences(r)
            return
        if self.drafter is not None:
            self.drafter.forget(r)
        self.cached.keep(r.seq_id, np.asarray(r.reusable_ids()), self._kv_kind(r))

    # ---- model calls --------------------------------------------------------------------------------
    def _encode(self, prompt: str, raw: bool) -> list[int]:
        if raw:
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])

    def _stream(self, prompt_ids: list[int], params: SamplingParams | None) -> Iterator[str]:
        pieces: deque[str] = deque()
        requests = self.make_requests(prompt_ids, params or SamplingParams(), lambda d: pieces.append(d.text))
        self.enqueue(requests)
        try:
            while any(r.finish_reason is None for r in requests) or pieces:
                if not pieces:
                    self.step()
                while pieces:
                    piece = pieces.popleft()
                    if piece:
                        yield piece
        finally:  # the consumer stopped early (e.g. Ctrl-C): free the sequence
            for r in requests:
                self.abort(r)

    def _forward(self, fn, seq_ids: list[int], lengths: list[int], ids: np.ndarray, *extra) -> Any:
        """The output of `fn`: logits, or (logits, final hidden states) in a library with adapter slots."""
        return self.kv.forward(fn, seq_ids, lengths, [ids, *extra], self._params, self.artifact.device)

    def _add_sequences(self, r: Request) -> None:
        r.seq_id = self.kv.add()
        if r.xlora is not None:
            r.scaling_seq_id = self.kv.add()

    def _remove_sequences(self, r: Request) -> None:
        if self.drafter is not None:
            self.drafter.forget(r)
        for seq_id in r.seq_ids:
            self.kv.remove(seq_id)
        r.seq_id = r.scaling_seq_id = -1

    def _prefill_inputs(
        self, requests: list[Request], lengths: list[int], every_position: bool, wanted: list[bool] | None = None
    ) -> list[np.ndarray]:
        """batch_prefill's inputs after the token ids and before the adapter scalings. Logits at every position,
        or at the last token of each request that `wanted` marks. A chunk that does not end its prompt needs
        none, and a large vocabulary's head costs as much as many layers (Gemma 3: 7.7 ms of a 128-token
        prompt's 300 at 1 thread)."""
        extra = [logit_positions(np.cumsum(lengths), every_position, wanted, self.some_logits_always)]
        if self.rope_switch_length:  # each token's whole prompt length (see rope_switch_length)
            extra.append(np.repeat([len(r.prompt_ids) for r in requests], lengths).astype("int32"))
        return extra

    def _model_call(
        self,
        prefill: bool,
        requests: list[Request],
        chunks: list[np.ndarray],
        every_position: bool = False,
        wanted: list[bool] | None = None,
    ) -> np.ndarray:
        """Logits of one batch_prefill (`prefill`) or batch_decode call over `chunks`, the next tokens of each of
        `requests` (with `every_position`, prefill's at every token, else at the last of each request that
        `wanted` marks). With adapter slots, X-LoRA requests' scaling-pass sequences take the same
        tokens first, in a call of their own: its final hidden states give those tokens' scalings."""
        fn = self._prefill if prefill else self._decode

        def call(
            seq_ids: list[int],
            rs: list[Request],
            parts: list[np.ndarray],
            every: bool,
            mixes: list[Mix],
            wanted: list[bool] | None,
        ):
            sizes = [len(c) for c in parts]
            extra = self._prefill_inputs(rs, sizes, every, wanted) if prefill else []
            if self.adapters.capacity:
                extra += self.adapters.call_inputs(mixes, sizes)
            return self._forward(fn, seq_ids, sizes, np.concatenate(parts).astype("int32"), *extra)

        mixes: list[Mix] = [r.adapter for r in requests]
        mixed = [i for i, r in enumerate(requests) if r.xlora is not None]
        if mixed:
            rs, parts = [requests[i] for i in mixed], [chunks[i] for i in mixed]
            shape = self.adapters.table_shape
            passes: list[Mix] = []
            for r, part in zip(rs, parts):
                rows = r.xlora.pass_scalings(len(part), shape)
                passes.append(-1 if rows is None else rows)
            hidden = call([r.scaling_seq_id for r in rs], rs, parts, False, passes, [False] * len(rs))[1].numpy()
            for i, r, rows in zip(mixed, rs, np.split(hidden, np.cumsum([len(c) for c in parts])[:-1])):
                mixes[i] = r.xlora.scalings(rows, shape)
        outputs = call([r.seq_id for r in requests], requests, chunks, every_position, mixes, wanted)
        return (outputs[0] if self.adapters.capacity else outputs).numpy()

    def _prefill_call(
        self, requests: list[Request], budget: int, every_position: bool = False
    ) -> list[tuple[Request, np.ndarray]]:
        """One ragged prefill call over the next pending tokens of `requests`, in order: for each, the rest of
        its current canonical chunk, while `budget` tokens allow (the first always goes, so steps make
        progress whatever the budget). Returns the logits of each request this call leaves with all its tokens
        in the KV cache: its last token's [vocab]; with `every_position`, those of every request, [tokens,
        vocab]."""
        batch = []
        for r in requests:
            chunk_end = (r.kv_len // self.canonical_chunk + 1) * self.canonical_chunk
            take = min(chunk_end, r.prefill_len) - r.kv_len
            if batch and take > budget:
                break
            batch.append((r, take))
            budget -= take
        chunks = [np.asarray(r.all_ids()[r.kv_len : r.kv_len + take], dtype="int32") for r, take in batch]
        # a recomputed request's prefill ends at its prompt and replays its outputs by decode steps
        wanted = [r.kv_len + take == r.num_ids() for r, take in batch]
        logits = self._model_call(True, [r for r, _ in batch], chunks, every_position, wanted)
        rows = iter(logits)
        ends = np.cumsum([take for _, take in batch])
        out = []
        for (r, take), end, done in zip(batch, ends, wanted):
            r.kv_len += take
            r.canonical_len = r.kv_len
            if r.kv_len == self.canonical_chunk and self.can_fork:
                self._split_first_chunk(r)
            if every_position:
                out.append((r, logits[end - take : end]))
            elif done:
                out.append((r, next(rows)))
        return out

    def _split_first_chunk(self, r: Request) -> None:
        """Make the first canonical chunk of `r` a block of its own (depth 0 of TVM's block tree), as it is in
        every sequence forked from a cached prefix: fork `r` at that boundary (no page is copied: the chunk
        ends on a page boundary) and continue as the fork (both of an X-LoRA request's sequences)."""
        child = self.kv.fork(r.seq_id, self.canonical_chunk)
        self.kv.remove(r.seq_id)
        r.seq_id = child
        if r.xlora is not None:
            child = self.kv.fork(r.scaling_seq_id, self.canonical_chunk)
            self.kv.remove(r.scaling_seq_id)
            r.scaling_seq_id = child

    # ---- speculative decoding ----
    def _drafts(self, decoding: list[Request]) -> list[tuple[Request, Draft]]:
        """Drafts for the decoding requests that may speculate, as many tokens as their budgets and the free KV
        pages allow. Constrained and X-LoRA requests, replays of preempted ones and LongRoPE models do not."""
        if self.rope_switch_length:  # its verify call would rotate by the prompt's factors, decode by the length's
            return []
        requests, counts = [], []
        spare = self._spare_pages()
        for r in decoding:
            room = r.params.max_tokens - len(r.output_ids) - 1  # drafts, leaving room for the target's own token
            if r.matcher is not None or r.xlora is not None or r.kv_len != r.num_ids() - 1 or room < 1:
                continue
            base = self.kv.pages_needed(r.kv_len + 1, r.fork_base)
            k = min(r.draft_limit or self.draft_tokens, room)
            while k and self.kv.pages_needed(r.kv_len + 1 + k, r.fork_base) - base > spare:
                k -= 1
            if k:
                spare -= self.kv.pages_needed(r.kv_len + 1 + k, r.fork_base) - base
                requests.append(r)
                counts.append(k)
        if not requests:
            return []
        try:
            drafts = self.drafter.propose(requests, counts)
        except Exception:  # a failing drafter costs speed, never a request: those requests decode plainly
            for r in requests:
                self.drafter.forget(r)
            return []
        return [(r, d) for r, d in zip(requests, drafts) if d.tokens]

    def _verify(self, speculating: list[tuple[Request, Draft]]) -> None:
        """Score each request's next token and its drafts in ragged prefill calls (logits at every token), then
        let each request keep what the rejection rule keeps."""
        while speculating:
            batch, budget = [], self.kernel_prefill_chunk
            for r, draft in speculating:
                if batch and len(draft.tokens) + 1 > budget:
                    break
                batch.append((r, draft))
                budget -= len(draft.tokens) + 1
            speculating = speculating[len(batch) :]
            chunks = [np.array([r.id_at(r.kv_len), *draft.tokens], dtype="int32") for r, draft in batch]
            logits = self._model_call(True, [r for r, _ in batch], chunks, every_position=True)
            ends = np.cumsum([len(c) for c in chunks])
            for (r, draft), end, chunk in zip(batch, ends, chunks):
                self._guard(r, self._accept_drafts, draft, logits[end - len(chunk) : end])

    def _accept_drafts(self, r: Request, draft: Draft, rows: np.ndarray) -> None:
        """Keep the drafts the rejection rule keeps and one token from the target; drop the rest's KV."""
        p = r.params
        tokens: list[int] = []
        adjusted_rows: list[np.ndarray] = []
        for i, row in enumerate(rows):
            adjusted = adjust_logits(row, p, r.prompt_ids, r.output_ids + tokens)
            if i < len(draft.tokens):
                q = None if draft.probs is None else draft.probs[i]
                token, kept = choose(adjusted, p, r.rng, draft.tokens[i], q)
            else:
                token, kept = sample(adjusted, p, r.rng), False
            tokens.append(token)
            adjusted_rows.append(adjusted)
            if not kept:
                break
        accepted = len(tokens) - 1
        # Draft more after a fully kept draft, less after a rejection (the schedule of transformers' assisted
        # generation): a rejected draft token still costs a row of the verify call.
        r.draft_limit = (
            min(self.draft_tokens, len(draft.tokens) + 2)
            if accepted == len(draft.tokens)
            else max(1, len(draft.tokens) - 1)
        )
        self.kv.pop(r.seq_id, len(draft.tokens) - accepted)
        r.kv_len += 1 + accepted
        self.drafter.rollback(r, accepted)
        self.counters["drafted_tokens"] += len(draft.tokens)
        self.counters["accepted_tokens"] += accepted
        for token, adjusted in zip(tokens, adjusted_rows):
            self._take(r, adjusted, token)
            if r.finish_reason is not None:
                break

    # ---- structured output --------------------------------------------------------------------------
    def _start_masks(self) -> None:
        """Compute the next-token masks of the running constrained requests in the helper thread, while the
        model runs (llguidance drops the GIL). A mask stays valid until its request takes a token."""
        constrained = [r for r in self.running if r.matcher is not None and r.mask is None]
        if not constrained:
            return
        if self._mask_pool is None:
            from llguidance import LLExecutor

            self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="mlcc-masks")
            self._mask_executor = LLExecutor()

        def compute() -> None:
            masks = compute_masks(self._mask_executor, [r.matcher for r in constrained], self.constraints.mask_words)
            for r, mask in zip(constrained, masks):
                r.mask = mask

        self._masks_pending = self._mask_pool.submit(compute)

    def _await_masks(self) -> None:
        """Wait for the helper thread's masks; should it fail, each request computes its own (and fails alone)."""
        pending, self._masks_pending = self._masks_pending, None
        if pending is not None:
            try:
                pending.result()
            except Exception:
                pass

    def _next_mask(self, r: Request) -> np.ndarray:
        self._await_masks()
        if r.mask is None:
            r.mask = compute_mask(r.matcher, self.constraints.mask_words)
        check(r.matcher)
        check_mask(r.mask)
        return r.mask

    # ---- sampling, stop conditions, streaming ---------------------------------------------------------
    def _accept_or_fail(self, r: Request, logits: np.ndarray) -> None:
        """Sample for `r`; whatever goes wrong there ends `r` alone, never the batch."""
        self._guard(r, self._accept, logits)

    def _guard(self, r: Request, action: Callable[..., None], *args: Any) -> None:
        """Run `action(r, *args)`; whatever goes wrong there ends `r` alone, never the batch."""
        try:
            action(r, *args)
        except Exception as e:
            if r.finish_reason is None:
                r.error = f"{type(e).__name__}: {e}" if not isinstance(e, MlccError) else str(e)
                self._finish(r, "error")

    def _accept(self, r: Request, logits: np.ndarray) -> None:
        """Sample the next token of `r` and apply the stop conditions."""
        p = r.params
        adjusted = adjust_logits(logits, p, r.prompt_ids, r.output_ids)
        if r.matcher is not None:
            adjusted = apply_mask(adjusted, self._next_mask(r))
        self._take(r, adjusted, sample(adjusted, p, r.rng))

    def _take(self, r: Request, adjusted: np.ndarray, token: int) -> None:
        """Append `token`, sampled from the row `adjusted`, to `r` and apply the stop conditions."""
        p = r.params
        if r.matcher is not None:
            r.mask = None
            r.matcher.consume_token(token)
            check(r.matcher)
        r.output_ids.append(token)
        if p.logprobs:
            r.logprobs.append(token_logprob(adjusted, token, p.top_logprobs))
        if (token in self.tokenizer.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            r.output_ids.pop()
            if p.logprobs:
                r.logprobs.pop()
            self._finish(r, "stop")
            return
        self.counters["generated_tokens"] += 1
        delta = r.decoder.add(token)
        r.text += delta
        longest_stop = max((len(s) for s in p.stop), default=0)
        if p.stop and delta:
            # only where the new text can complete a stop string: earlier text was searched at earlier steps
            start = max(0, len(r.text) - len(delta) - longest_stop + 1)
            cut = min((i for i in (r.text.find(s, start) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                r.text = r.text[:cut]
                self._finish(r, "stop")
                return
        if r.matcher is not None and r.matcher.is_stopped():  # the constraint is complete: nothing may follow
            self._finish(r, "stop")
            return
        if len(r.output_ids) >= p.max_tokens:
            self._finish(r, "length")
            return
        self._emit(r, hold=max(longest_stop - 1, 0))

    def _emit(self, r: Request, hold: int = 0, final: bool = False) -> None:
        """Stream new text, holding back a tail that might still become a stop string."""
        upto = max(len(r.text) - hold, r.emitted_chars)
        if r.on_delta and (upto > r.emitted_chars or final):
            r.on_delta(
                Delta(
                    r.text[r.emitted_chars : upto],
                    r.output_ids[r.emitted_tokens :],
                    r.logprobs[r.emitted_tokens :],
                    r.finish_reason if final else None,
                    r.error if final else None,
                )
            )
            r.emitted_chars, r.emitted_tokens = upto, len(r.output_ids)

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        self._emit(r, final=True)
        self._release(r)
