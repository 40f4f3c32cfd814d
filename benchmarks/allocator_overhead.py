"""Host bookkeeping cost of the KV cache manager, per running request per decode step.

R requests (ShareGPT-like prompts with shared prefixes, prefix caching on) are admitted
into a pool large enough for all of them; then every request decodes one token per
step for a number of steps. Reported: microseconds of manager time per running request
per decode step, and per admitted request (add_request + lookup + allocate of the
whole prompt), for each allocator in the same run.

    python benchmarks/allocator_overhead.py --json overhead.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from jenga_jax.core import ALLOCATORS, KVCacheManager, get_layout
from jenga_jax.core.workloads import sharegpt_like

DEFAULT_MODELS = ["llama-3.1-8b", "gemma-3-27b", "ministral-8b", "jamba-1.5-mini", "gpt-oss-20b"]


def measure(model: str, allocator: str, running: int, steps: int, seed: int) -> dict:
    layout = get_layout(model, state_checkpoint_interval=512)
    trace = sharegpt_like(running, seed=seed)
    manager = KVCacheManager(layout, 200 << 30, allocator=allocator)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for req in trace:
        rid = manager.add_request(req.request_id, req.prompt_token_ids)
        hit = manager.lookup(rid)
        assert manager.allocate(rid, manager.num_tokens(rid) - hit)
        # The first decode step commits the prefill (caches, releases out-of-window pages).
        assert manager.allocate(rid, 1, [rng.randrange(32000)])
    admit_us = (time.perf_counter() - t0) / len(trace) * 1e6
    ids = [req.request_id for req in trace]
    tokens = [[rng.randrange(32000)] for _ in range(steps * len(ids))]
    it = iter(tokens)
    allocate = manager.allocate
    t0 = time.perf_counter()
    for _ in range(steps):
        for rid in ids:
            allocate(rid, 1, next(it))
    decode_us = (time.perf_counter() - t0) / (steps * len(ids)) * 1e6
    t0 = time.perf_counter()
    for rid in ids:
        manager.free(rid)
    free_us = (time.perf_counter() - t0) / len(ids) * 1e6
    return {
        "model": model,
        "allocator": allocator,
        "running_requests": running,
        "us_per_request_decode_step": round(decode_us, 3),
        "us_per_admitted_request": round(admit_us, 1),
        "us_per_freed_request": round(free_us, 1),
        "decode_steps": steps,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=ALLOCATORS)
    p.add_argument("--running", nargs="+", type=int, default=[64, 256])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    rows = []
    print(
        f"{'model':<16} {'allocator':<8} {'running':>7} {'us/req/step':>11} "
        f"{'us/admit':>9} {'us/free':>8}"
    )
    for model in args.models:
        for running in args.running:
            for allocator in args.allocators:
                row = measure(model, allocator, running, args.steps, args.seed)
                rows.append(row)
                print(
                    f"{model:<16} {allocator:<8} {running:7d} "
                    f"{row['us_per_request_decode_step']:11.2f} "
                    f"{row['us_per_admitted_request']:9.1f} {row['us_per_freed_request']:8.1f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
