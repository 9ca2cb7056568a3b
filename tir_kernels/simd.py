"""Builders of vector TIR expressions shared by the hand-written CPU kernels: loads, splats, lane shuffles,
sums in a fixed order, LLVM intrinsics (x86 AVX2 integer dot products, fused multiply-adds, prefetches), and
which of those the target CPU has."""

from __future__ import annotations

import enum

import tvm
from tvm import tirx
from tvm.script import tirx as T
from tvm.target import codegen

LANES = 8  # float32 lanes of an AVX2 register: the vector width every CPU kernel here is written for


def tree_sum(terms: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """The sum of `terms` as a balanced tree: independent chains the CPU can overlap."""
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def concat(parts: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """The lanes of `parts` side by side in one vector (a single part as it is)."""
    if len(parts) == 1:
        return parts[0]
    lanes = sum(p.ty.dtype.lanes for p in parts)
    return tirx.Shuffle(parts, [tirx.IntImm("int32", i) for i in range(lanes)])


def row_sums(rows: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """[sum(rows[0]), ..., sum(rows[n - 1])] for n vectors of n lanes (n a power of two): pairs of vectors are
    halved by adding their even and odd lanes until one is left, which holds the sums in order
    (3n - 3 vector ops for n = 8, instead of n horizontal sums)."""
    lanes = rows[0].ty.dtype.lanes
    even = [tirx.IntImm("int32", i) for i in range(0, 2 * lanes, 2)]
    odd = [tirx.IntImm("int32", i) for i in range(1, 2 * lanes, 2)]
    while len(rows) > 1:
        rows = [tirx.Shuffle([a, b], even) + tirx.Shuffle([a, b], odd) for a, b in zip(rows[0::2], rows[1::2])]
    return rows[0]


def lanes_of(v: tirx.PrimExpr, first: int, count: int) -> tirx.PrimExpr:
    """Lanes first .. first + count of vector v."""
    if count == 1:
        return tirx.Shuffle([v], [tirx.IntImm("int32", first)])
    return tirx.Shuffle([v], [tirx.IntImm("int32", first + i) for i in range(count)])


def hsum8(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """ggml's `hsum_float_8` (and tinyBLAS's hsum): ((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7))."""
    r = lanes_of(v, 4, 4) + lanes_of(v, 0, 4)
    s = lanes_of(r, 0, 2) + lanes_of(r, 2, 2)
    return lanes_of(s, 0, 1) + lanes_of(s, 1, 1)


def lane_sum(v: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """hsum_float_8's order across 8 vectors (lane m of each row in v[m]): ((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7))."""
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))


def load(data: tirx.Buffer, row: tirx.PrimExpr, start: tirx.PrimExpr, lanes: int) -> tirx.PrimExpr:
    """data[row, start : start + lanes] as one vector."""
    return tirx.BufferLoad(data, [row, tirx.Ramp(start, 1, lanes)])


def halves(data: tirx.Buffer, row: tirx.PrimExpr, at: tirx.PrimExpr) -> tirx.PrimExpr:
    """The 8 float16 values at data[row, at : at + 16] (bytes) as float32x8: 8 rows' scales or mins."""
    return tirx.reinterpret("float16x8", load(data, row, at, 16)).astype("float32x8")


def splat(value: float | int | tirx.PrimExpr, lanes: int, dtype: str = "float32") -> tirx.PrimExpr:
    """`value` in each of `lanes` lanes (itself for one); a Python number becomes a `dtype` constant."""
    scalar = tirx.const(value, dtype) if isinstance(value, (int, float)) else value
    return scalar if lanes == 1 else tirx.Broadcast(scalar, lanes)


def bcast(value: int, dtype: str, lanes: int) -> tirx.PrimExpr:
    """An integer constant in all `lanes` lanes of a vector (masks and shifts)."""
    return tirx.Broadcast(tirx.const(value, dtype), lanes)


def u8x32(value: int) -> tirx.PrimExpr:
    """`value` in all 32 lanes of a uint8 vector (masks and shifts of packed codes)."""
    return bcast(value, "uint8", 32)


def broadcast_as(value: int | tirx.PrimExpr, dtype: str, lanes: int) -> tirx.PrimExpr:
    """`value` (a Python int, or an expression that unrolling makes one) cast to `dtype`, in `lanes` lanes."""
    return tirx.Broadcast(tirx.const(value, dtype) if isinstance(value, int) else value.astype(dtype), lanes)


def shift_bytes(v: tirx.PrimExpr, bits: int | tirx.PrimExpr, right: bool) -> tirx.PrimExpr:
    """The uint8x32 `v` shifted `bits` (an int, or an expression that unrolling makes one) as 16-bit lanes:
    each byte gets bits of its neighbour where a byte shift would get zeros, which the caller masks away. LLVM
    makes byte shifts `vgf2p8affineqb`, which on Zen 4 runs on the pipes of `vpdpbusd` and the fused
    multiply-adds (Q5_0's exact kernel, 640x2048, 128 tokens, 1 thread: 2305 -> 2190 us)."""
    amount = broadcast_as(bits, "uint16", 16)
    wide = tirx.reinterpret("uint16x16", v)
    moved = wide >> amount if right else wide << amount
    return tirx.reinterpret("uint8x32", moved)


def vec_const(values: list[int], dtype: str) -> tirx.PrimExpr:
    """A constant vector, built from broadcasts so no buffer is needed."""
    return tirx.Shuffle([tirx.const(v, dtype) for v in values], [tirx.IntImm("int32", i) for i in range(len(values))])


def span(lanes: int, start: tirx.PrimExpr | int = 0) -> tirx.PrimExpr:
    """Index of `lanes` consecutive elements from `start` (a plain index for one)."""
    return tirx.Ramp(start, 1, lanes) if lanes > 1 else tirx.convert(start)


def f16_round(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """x rounded to float16 and back (scalar or vector)."""
    lanes = x.ty.dtype.lanes
    half = "float16" if lanes == 1 else f"float16x{lanes}"
    return x.astype(half).astype(x.ty.dtype)


def llvm_intrin(dtype: str, name: str, *args: tirx.PrimExpr) -> tirx.PrimExpr:
    """A pure LLVM intrinsic call (x86 `pmaddubsw`, `pmaddwd`, `psign`, `vpdpbusd`, abs, ...)."""
    return tirx.call_llvm_pure_intrin(dtype, name, *args)


def vpdpbusd(total: tirx.PrimExpr, codes: tirx.PrimExpr, activations: tirx.PrimExpr) -> tirx.PrimExpr:
    """total (int32, 8 or 16 lanes) plus each lane's 4 unsigned bytes of `codes` times its 4 signed bytes of
    `activations` (AVX512-VNNI / AVX-VNNI)."""
    lanes = total.ty.dtype.lanes
    return llvm_intrin(f"int32x{lanes}", f"llvm.x86.avx512.vpdpbusd.{32 * lanes}", total, codes, activations)


def fma(a: tirx.PrimExpr, b: tirx.PrimExpr, c: tirx.PrimExpr) -> tirx.PrimExpr:
    """a * b + c rounded once (scalar or float32 vector)."""
    lanes = c.ty.dtype.lanes
    name, dtype = ("llvm.fma.f32", "float32") if lanes == 1 else (f"llvm.fma.v{lanes}f32", f"float32x{lanes}")
    return tirx.call_llvm_pure_intrin(dtype, name, a, b, c)


def prefetch(data: tirx.Buffer, row: tirx.PrimExpr, byte: tirx.PrimExpr, into_l1: bool = True) -> tirx.PrimExpr:
    """A hint to load the cache line holding data[row, byte] for reading: into every cache level (`prefetcht0`),
    or without `into_l1` into L2 and L3 (`prefetcht1`). A one-token pass streams its weights from memory: there
    L1's few fill buffers, each held by a line until it arrives, limit the lines in flight (Intel Xeon, 1B Llama
    Q4_0 gate 2048x8192, one token: 10.9 -> 13.4 GB/s at 1 thread, 20.8 -> 26.0 at 2, of 14.5 / 28 measured)."""
    address = tirx.address_of(tirx.BufferLoad(data, [row, byte]))
    locality = 3 if into_l1 else 2
    args = (address, tirx.const(0, "int32"), tirx.const(locality, "int32"), tirx.const(1, "int32"))
    return tirx.call_llvm_intrin("void", "llvm.prefetch.p0", *args)


def has_avx2(target: tvm.target.Target) -> bool:
    return target.kind.name == "llvm" and bool(codegen.target_has_features("avx2", target))


def vector_registers(target: tvm.target.Target) -> int:
    """The vector registers kernels may keep accumulators in: 32 with AVX-512 (also for 256-bit vectors), else 16."""
    return 32 if has_avx2(target) and codegen.target_has_features("avx512f", target) else 16


def has_vnni(target: tvm.target.Target) -> bool:
    """`vpdpbusd` on 256-bit vectors (AVX512-VNNI with AVX512-VL, or AVX-VNNI): pmaddubsw + pmaddwd in one."""

    def has(feature: str) -> bool:
        return bool(codegen.target_has_features(feature, target))

    return has_avx2(target) and (has("avxvnni") or (has("avx512vnni") and has("avx512vl")))


class AskAhead(enum.IntEnum):
    """How a one-token kernel (decode) reads its weights. NONE: one row group after another, the hardware
    prefetcher alone (but for Q6_K's two interleaved streams, which ask into L1, and long rows: `LONG_ROW` for
    Q4_K, `PREFETCHED_ROW` for the others); ONE_GROUP: the same, asking for the weights ahead; PAIRS: two groups
    side by side in 512-bit vectors (AVX-512 VNNI), asking ahead. Q4_K asks on rows of `LONG_ROW` columns or more
    whatever this says."""

    NONE = 0
    ONE_GROUP = 1
    PAIRS = 2


def asks_ahead(target: tvm.target.Target) -> AskAhead:
    """What suits the target's CPU, as measured: on an Intel Xeon (AMX, LLVM's "rocketlake") Q4_K decode of a 1B
    Llama 17.5-17.9 -> 19.6-20.4 tok/s at 1 thread, 31.8-32.4 -> 34.6-36.3 at 2 with PAIRS; on AMD Zen 4 asking
    cost a quarter (38-39 -> 28-31 tok/s), on short rows too (2048x8192, GB/s from memory: 23.8 -> 22.4); on Zen 5
    one group asking helps (1 thread: 1024x640 28.3 -> 31.9, 2048x640 29.2 -> 33.1; 2 threads 36.6 -> 41.8, 40.6
    -> 42.6) where PAIRS does not (2048x640, 2 threads, 25.5). An x86-64 level runs on any of them: NONE."""
    cpu = str(target.attrs.get("mcpu", ""))
    if not has_avx2(target) or cpu.startswith(("bdver", "btver", "x86-64")):
        return AskAhead.NONE
    if cpu.startswith("znver"):
        generation = cpu.removeprefix("znver")
        return AskAhead.ONE_GROUP if generation.isdigit() and int(generation) >= 5 else AskAhead.NONE
    return AskAhead.PAIRS


def has_amx(target: tvm.target.Target) -> bool:
    """AMX's int8 tile multiply-adds (with VNNI's `vpdpbusd` for what tiles do not take)."""
    amx = all(codegen.target_has_features(feature, target) for feature in ("amx-tile", "amx-int8"))
    return has_vnni(target) and bool(amx) and bool(codegen.target_has_features("avx512f", target))


# How the CPU matmuls split their work (mlcc's and llama.cpp's orders alike).
TASKS = 64  # parallel row ranges: enough to balance 16 threads, few accumulators
TOKENS = 8  # tokens per pass over a weight row (prefill and batched decode); 8 accumulators of 8 lanes
QUAD = 4  # tokens that share each decoded word of the weights in llama.cpp-order kernels
LANE_ACTIVATION_BYTES = 256 * 1024  # int8 activations that pass over one unpacked group of rows
STREAM_AHEAD = 3072  # bytes of interleaved weights prefetched ahead of the chunk being multiplied
# The same for one-token passes (decode), whose asks go into L2 only (`prefetch`) and can reach further: Intel
# Xeon, copies cycled past the caches, 1 / 2 threads, GB/s at 3072 -> 6144 bytes: Q5_0 640x2048 11.0 / 18.7 ->
# 14.0 / 25.0, Q4_1 576x1536 10.8 / 19.1 -> 12.7 / 21.7, Q8_0 640x262144 13.0 / 24.9 -> 13.7 / 26.1, Q4_0
# 4096x14336 level; Q4_K 2048x8192 12.1 / 23.0 at 1536, 13.2 / 25.1 at 6144, 12.9 / 25.2 at 12288.
TOKEN_AHEAD = 6144


FEW_ROWS = 4  # row loops this short run on the calling thread: waking the pool (~3 us at 2 threads) costs more


@T.macro
def each_row(count, step, args):
    """step(i, *args) for i < count: in parallel, or on the calling thread for fewer than FEW_ROWS rows (the
    activations of a decode step, one token per sequence)."""
    if count >= FEW_ROWS:
        for i in T.parallel(count):
            step(i, *args)
    else:
        for i in range(count):
            step(i, *args)


# Columns per parallel piece of a row too long to run on the calling thread (`each_span`), and the spans a row
# needs for that: shorter ones stay there (Gemma 3 270M's GeGLU, 2048 columns, in 2 spans: decode level or
# slower at 2 threads, 84.3 against 87.2 tok/s in alternating runs).
SPAN = 1024
MIN_SPANS = 4


@T.macro
def each_span(count, width: int, step, args):
    """step(i, first, last, *args) for rows i < count, as `each_row` does, except that fewer than FEW_ROWS rows
    of MIN_SPANS * SPAN columns or more also go in parallel, in spans [first, last) of SPAN columns (the last
    ends at `width`). For element-wise kernels, whose one-row calls (a decode step) would otherwise run on the calling
    thread while the pool waits (SwiGLU of a 1B Llama, 8192 columns, 2 threads: 5.7 -> 4.3 us alone)."""
    spans = T.meta_var((width + SPAN - 1) // SPAN)
    if count >= FEW_ROWS or width < MIN_SPANS * SPAN:
        each_row(count, lambda i, *rest: step(i, 0, width, *rest), args)
    else:
        for piece in T.parallel(count * spans):
            step(piece // spans, piece % spans * SPAN, T.min(piece % spans * SPAN + SPAN, width), *args)


CLAIMS_PER_LINE = 16  # int32 words of a 64-byte cache line


def claim_words(tasks: int) -> int:
    """int32 words of the claims of `tasks` parallel tasks (`claimed_tasks`): one a task, 16 to a cache line,
    then a line for the word that says every task is taken."""
    return (-(-tasks // CLAIMS_PER_LINE) + 1) * CLAIMS_PER_LINE


@T.macro
def clear_claims(claims, tasks: int):
    for i in range(claim_words(tasks)):
        claims[i] = 0


@T.macro
def claimed_tasks(slot, tasks: int, claims, step, args):
    """step(task, *args) for each task < `tasks` that parallel slot `slot` claims first, from its own task on
    (wrapping around), so that every task runs once and a thread done with its run of slots takes the tasks
    another has not started. TVM's pool gives each thread a fixed run of slots, and on a shared machine one
    thread's run often ends well after the other's (a 2-thread decode step of a 1B Llama: each thread waited
    for the other's matmul tasks 6-10% of the time, in runs of 50-350 us). Claimed with x86's `lock bts` on the
    task's word (the int8-activation kernels are x86-only), 16 words a cache line: one thread's run when there
    are few threads. The first slot to finish its lap sets the word on the last line, at which every other slot
    stops: a thread's later slots cost a load. `task` is a bound variable, not an expression of `slot`:
    inlined as `(slot + k) % tasks` it left Q4_K's one-token loop, when decode claimed too, computing
    addresses apart (1 thread, 16384x2048, 14.0 -> 12.8 GB/s).

    For prefill: its tasks are long (Gemma 3's 512-token prefill at 2 threads, 464-623 -> 548-830 tok/s in
    alternating runs; 1 thread level). A decode step's tasks are short and its locks wait on the weights' loads
    in flight: SmolLM2 at 1 thread 114 -> 109 tok/s, a 1B Llama at 2 threads only 2-3% faster."""
    done = T.meta_var(claim_words(tasks) - CLAIMS_PER_LINE)
    if claims[done] == 0:
        for k in range(tasks):
            task: T.let[T.int32] = (slot + k) % tasks
            if claims[done] == 0:
                if T.call_llvm_intrin("int32", "llvm.x86.atomic.bts", T.address_of(claims[task]), T.int8(0)) == 0:
                    step(task, *args)
        claims[done] = 1


def task_share(task: tirx.PrimExpr, tasks: int, count: int) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """(first, size) of parallel task `task`'s share of `count` items split over `tasks` tasks as evenly as
    integers allow. TVM's thread pool gives each thread a contiguous run of tasks, so shares of ceil(count /
    tasks) would leave the last threads short: 80 row groups over 64 tasks as 40 tasks of 2 and 24 idle ones
    give one of 2 threads 64 groups and the other 16."""
    first = task * count // tasks
    return first, (task + 1) * count // tasks - first


@T.macro
def store_rows(y, t, g, n_out: int, result, spill, at):
    """y[t, g*8 .. g*8+7] = result (float32x8, row r in lane r), rows past n_out dropped: those go through
    spill[at .. at+8]."""
    if g * LANES + LANES <= n_out:
        y[t, T.Ramp(g * LANES, 1, LANES)] = result
    else:
        spill[T.Ramp(at, 1, LANES)] = result
        for r in range(LANES):
            if g * LANES + r < n_out:
                y[t, g * LANES + r] = spill[at + r]


def unit_count(row_groups: int, pairs: bool) -> int:
    """How many units of work (`unit_groups`) cover `row_groups` groups of 8 rows."""
    return -(-row_groups // 2) if pairs else row_groups


def unit_groups(unit: tirx.PrimExpr, row_groups: int, pairs: bool) -> tuple[tirx.PrimExpr, ...]:
    """The row groups one unit of work takes: groups 2 unit and 2 unit + 1 side by side with `pairs` (the last
    unit of an odd count: its one group twice, stored once), else group `unit`. The `min` only for an odd count:
    a claimed task's units have no bounds the simplifier knows, and the `min` left in every address of the
    second group cost Q4_K's one-token loop a register when decode claimed too (`claimed_tasks`)."""
    if not pairs:
        return (unit,)
    return (2 * unit, 2 * unit + 1 if row_groups % 2 == 0 else tirx.min(2 * unit + 1, row_groups - 1))


@T.macro
def each_token_block(task, tasks: int, units: int, row_groups: int, pairs: bool, n, block_tokens: int, step, args):
    """step(gs, first, count, *args) for the units of task `task` (`task_share`, `unit_groups`) and the n
    tokens in blocks of `block_tokens` from `first` (their activations stay in L2 while the units pass)."""
    first_unit, task_units = T.meta_var(task_share(task, tasks, units))
    for tb in range((n + block_tokens - 1) // block_tokens):
        for ui in range(task_units):
            gs = T.meta_var(unit_groups(first_unit + ui, row_groups, pairs))
            first = T.meta_var(tb * block_tokens)
            step(gs, first, T.min(n, first + block_tokens) - first, *args)


def unit_group_range(first_unit, units, row_groups: int, pairs: bool) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """(first, count) of the row groups in `units` units from `first_unit` on (`unit_groups`), each group once."""
    if not pairs:
        return first_unit, units
    first = 2 * first_unit
    return first, tirx.min(2 * units, row_groups - first)


@T.macro
def prefetch_groups(data, gs, byte, into_l1, stride: int, ahead: int):
    """`prefetch` of data[g, byte] for each group g in `gs` (rows `stride` bytes apart; `byte` at most `ahead`
    bytes past the row's part being read). Two groups side by side are read as two streams followed by the next
    two groups', so a byte past the end of a row is asked for in the row 2 on, 4 on, ... (the next row is the
    second group, read already): else each new pair starts cold (Q4_K, 1 thread, 2048x8192: 13.2 GB/s, 15.0-15.8
    so; SmolLM2's decode, rows shorter than the distance ahead: 150-171 -> 177-194 tok/s). Where the distance is
    within a row one step does, without the division (Q4_K 2048x8192: 14.8 GB/s with it)."""
    if len(gs) == 2:
        one_step = T.meta_var(ahead + 64 <= stride)
        at = T.meta_var(
            T.if_then_else(byte < stride, byte, byte + stride) if one_step else byte + byte // stride * stride
        )
        T.evaluate(prefetch(data, gs[0], at, into_l1))
        T.evaluate(prefetch(data, gs[1], at, into_l1))
    else:
        T.evaluate(prefetch(data, gs[0], byte, into_l1))


@T.macro
def each_chunk_line(chunk, chunk_bytes: int, exact: bool, ask, part: int = 0, parts: int = 1):
    """ask(offset) for the 64-byte lines of chunk `chunk` in a stream of `chunk_bytes`-byte chunks (of
    those, every `parts`th from `part` on), offsets from the stream's start. `exact` (one-token passes over rows
    longer than the distance asked ahead): the lines whose start falls in the chunk, each line of the stream once
    (Xeon, 2 threads, GB/s from memory, Q4_K / Q4_0 2048x8192: 24.7 / 27.8 -> 25.2 / 28.4, 8192x2048 26.4 / 27.6
    -> 26.5 / 28.1); else ceil(chunk_bytes / 64) lines from the chunk's start, reaching into the next chunk (on
    shorter rows the exact lines ran 2-5% slower: Q5_0 / Q4_1 / Q6_K 1536x576; prefill: no faster)."""
    if exact:
        first = T.meta_var((chunk * chunk_bytes + 63) // 64)
        for k in T.unroll(chunk_bytes // 64 + 1):
            if k % parts == part and (first + k) * 64 < (chunk + 1) * chunk_bytes:
                ask((first + k) * 64)
    else:
        for line in T.unroll((chunk_bytes + 63) // 64):
            if line % parts == part:
                ask(chunk * chunk_bytes + line * 64)


@T.macro
def stream_groups(
    data, gs, base, chunk, chunk_bytes: int, into_l1: bool, stride: int, ahead: int, part=0, parts=1, distance=None
):
    """`prefetch_groups` of chunk `chunk`'s lines of the groups' rows (`stride` bytes; the chunks from byte `base`
    on), `ahead` bytes on (or `distance`, a value of at most `ahead` known at run time): exact lines
    (`each_chunk_line`) in one-token passes over rows longer than that."""
    exact = T.meta_var(not into_l1 and ahead + 64 <= stride)
    on = T.meta_var(ahead if distance is None else distance)
    ask = T.meta_var(lambda at: prefetch_groups(data, gs, base + on + at, into_l1, stride, ahead))
    each_chunk_line(chunk, chunk_bytes, exact, ask, part, parts)


@T.macro
def store_groups(y, t, gs, n_out: int, acc, at):
    """y[t, rows of the groups in `gs`] = acc[at ..] (their rows side by side, 8 a group); a second group equal
    to the first is not stored again."""
    store_rows(y, t, gs[0], n_out, acc[T.Ramp(at, 1, LANES)], acc, at)
    if len(gs) == 2:
        if gs[1] != gs[0]:
            store_rows(y, t, gs[1], n_out, acc[T.Ramp(at + LANES, 1, LANES)], acc, at + LANES)
