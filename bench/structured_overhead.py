"""Added time per decoded token with a JSON schema, against the decode step, on a real artifact.

Runs one request at a time, free (ignore_eos) and constrained by a nested schema in turn, and reports
  - the decode step (median over all steps of each kind; the first step, the prefill, left out),
  - the host work a constraint adds on the step's critical path: the mean time the engine spends accepting a
    token (mask wait, mask applied to the logits, sampling, the matcher taking the token) minus a free one's,
  - the helper thread's mask time, which runs while the model computes (not on the critical path).

    python bench/structured_overhead.py ARTIFACT [--tokens 160] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import runtime.engine as engine_module
from runtime import Engine, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 8,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "age": {"type": "integer"},
                    "height": {"type": "number"},
                    "role": {"enum": ["admin", "editor", "viewer"]},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "maxLength": 20},
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["city", "zip"],
                    },
                },
                "required": ["name", "age", "height", "role", "address"],
            },
        }
    },
    "required": ["people"],
}
PROMPT = "List eight people with name, age, height, role and address as JSON."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    engine = Engine(args.artifact, max_batch_size=1, threads=args.threads, prefix_cache=False)
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])

    accept_times: dict[bool, list[float]] = {False: [], True: []}
    original_accept = engine._accept

    def timed_accept(r, logits):
        start = time.perf_counter()
        try:
            return original_accept(r, logits)
        finally:
            accept_times[r.matcher is not None].append(time.perf_counter() - start)

    engine._accept = timed_accept  # type: ignore[method-assign]
    mask_times: list[float] = []
    original_masks = engine_module.compute_masks

    def timed_masks(*a):
        start = time.perf_counter()
        try:
            return original_masks(*a)
        finally:
            mask_times.append(time.perf_counter() - start)

    engine_module.compute_masks = timed_masks

    def run(params: SamplingParams) -> list[float]:
        requests = engine.make_requests(ids, params)
        engine.enqueue(requests)
        steps = []
        while requests[0].finish_reason is None:
            start = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - start)
        return steps[1:]

    steps: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        steps[False] += run(SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True))
        steps[True] += run(SamplingParams(max_tokens=args.tokens, temperature=0, json_schema=SCHEMA))
    free_step, constrained_step = (float(np.median(steps[k])) * 1e3 for k in (False, True))
    added = (np.mean(accept_times[True][1:]) - np.mean(accept_times[False][1:])) * 1e3
    print(f"decode step (median): free {free_step:.2f} ms, with the schema {constrained_step:.2f} ms")
    print(f"added on the critical path per token: {added:.3f} ms = {100 * added / free_step:.2f}% of the free step")
    print(
        f"mask in the helper thread, overlapping the model: median {np.median(mask_times) * 1e3:.3f} ms, "
        f"mean {np.mean(mask_times) * 1e3:.3f} ms ({100 * np.mean(mask_times) * 1e3 / free_step:.2f}% of the step)"
    )


if __name__ == "__main__":
    main()
