"""Host bookkeeping cost of the KV cache manager, per running request per decode step.

`--mode steady` (default): R requests (ShareGPT-like prompts with shared prefixes,
prefix caching on) are admitted into a pool large enough for all of them; then every
request decodes one token per step for a number of steps. Reported: microseconds of
manager time per running request per decode step, and per admitted request
(add_request + lookup + allocate of the whole prompt), for each allocator.

`--mode evicting`: a memory-bound trace with prefix caching on, so that the cache
fills and evicts constantly (default: 500 ShareGPT-like requests with prompts of mean
~2000 tokens and outputs of mean ~300, a 16 GiB pool, 16-token pages). Requests are
served by continuous batching (as `memory_sim`: decode every running request, preempt
the newest when memory runs out, admit FCFS while the prompt fits, free on finish).
EVERY manager call is timed (add_request, lookup, allocate, preempt, free). Reported:
manager time per running request per decode step (mean over the run, and the p99 over
steps of that step's time / its running requests), the slowest single call (and which
kind of call it was), the number of evicted pages, and the wall time of the run.

    python benchmarks/allocator_overhead.py --json overhead.jsonl
    python benchmarks/allocator_overhead.py --mode evicting --json evicting.jsonl
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import random
import sys
import time

from jenga_jax.core import ALLOCATORS, KVCacheManager, get_layout
from jenga_jax.core.workloads import sharegpt_like

EVICTING_MODELS = ["gemma-3-27b", "ministral-8b"]
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


def evicting_trace(num_requests: int, prompt_mean: float, output_mean: float, seed: int):
    """ShareGPT-like turns (follow-ups share prefixes) with the given mean lengths."""
    total = prompt_mean * 1085 / 800  # sharegpt_like: the prompt is ~800/1085 of the total
    trace = sharegpt_like(num_requests, seed=seed, total_tokens_mean=total)
    scale = output_mean / (total * 285 / 1085)
    return [dataclasses.replace(r, output_len=max(1, round(r.output_len * scale))) for r in trace]


class CallTimer:
    """Times every manager call; keeps the time of the current step and the slowest call."""

    def __init__(self):
        self.step_ns = 0
        self.total_ns = 0
        self.calls = 0
        self.max_ns = 0
        self.max_call = ""
        self.max_by_op: dict[str, int] = {}  # slowest call per op (admit: a prompt's allocate)

    def __call__(self, fn, *args, op: str = "", **kwargs):
        t0 = time.perf_counter_ns()
        out = fn(*args, **kwargs)
        dt = time.perf_counter_ns() - t0
        self.step_ns += dt
        self.calls += 1
        op = op or fn.__name__
        if dt > self.max_ns:
            self.max_ns, self.max_call = dt, op
        if dt > self.max_by_op.get(op, 0):
            self.max_by_op[op] = dt
        return out


def measure_evicting(
    model: str, allocator: str, trace, budget_bytes: int, tokens_per_page: int, seed: int
) -> dict:
    layout = get_layout(model, state_checkpoint_interval=512)
    manager = KVCacheManager(
        layout, budget_bytes, allocator=allocator, tokens_per_page=tokens_per_page
    )
    timed = CallTimer()
    rng = random.Random(seed)
    waiting = collections.deque()
    left = {}
    wall0 = time.perf_counter()
    for req in trace:  # every request arrives at step 0
        timed(
            manager.add_request, req.request_id, req.prompt_token_ids, max_new_tokens=req.output_len
        )
        waiting.append(req.request_id)
        left[req.request_id] = req.output_len
    running: list[str] = []  # admission order: the newest is last
    per_step = []  # manager microseconds per running request, per decode step
    steps = running_steps = preemptions = 0
    while waiting or running:
        decoding = len(running)
        i = 0
        while i < len(running):  # decode: one token per running request, oldest first
            rid = running[i]
            while not timed(manager.allocate, rid, 1, [rng.randrange(32000)]):
                victim = running.pop()
                timed(manager.preempt, victim)
                waiting.appendleft(victim)
                preemptions += 1
                if victim == rid:
                    break
            else:
                left[rid] -= 1
                i += 1
        while waiting:  # admit FCFS while the whole prompt fits
            rid = waiting[0]
            hit = timed(manager.lookup, rid)
            if not timed(manager.allocate, rid, manager.num_tokens(rid) - hit, op="admit"):
                break
            waiting.popleft()
            running.append(rid)
            left[rid] -= 1  # the prefill's logits give the next token
        for rid in [r for r in running if left[r] <= 0]:  # finish
            running.remove(rid)
            timed(manager.free, rid)
        steps += 1
        if decoding:
            per_step.append(timed.step_ns / decoding / 1e3)
            running_steps += decoding
        timed.total_ns += timed.step_ns
        timed.step_ns = 0
    wall = time.perf_counter() - wall0
    per_step.sort()
    return {
        "mode": "evicting",
        "model": model,
        "allocator": allocator,
        "requests": len(trace),
        "kv_budget_gib": budget_bytes / 2**30,
        "tokens_per_page": tokens_per_page,
        "steps": steps,
        "mean_running": round(running_steps / max(steps, 1), 1),
        "us_per_request_decode_step": round(timed.total_ns / 1e3 / max(running_steps, 1), 3),
        "p99_us_per_request_decode_step": round(per_step[int(0.99 * (len(per_step) - 1))], 3),
        "max_call_us": round(timed.max_ns / 1e3, 1),
        "max_call": timed.max_call,
        "max_call_us_by_op": {op: round(ns / 1e3, 1) for op, ns in timed.max_by_op.items()},
        "heap_pushes_per_evicted_page": round(
            getattr(manager.alloc, "heap_pushes", 0) / max(manager.alloc.evicted_pages, 1), 2
        ),
        "manager_calls": timed.calls,
        "evicted_pages": manager.alloc.evicted_pages,
        "preemptions": preemptions,
        "wall_s": round(wall, 2),
    }


def run_evicting(args) -> list[dict]:
    trace = evicting_trace(args.requests, args.prompt_mean, args.output_mean, args.seed)
    prompt = sum(len(r.prompt_token_ids) for r in trace) / max(len(trace), 1)
    output = sum(r.output_len for r in trace) / max(len(trace), 1)
    print(
        f"{len(trace)} requests, prompt mean {prompt:.0f}, output mean {output:.0f}, "
        f"{args.budget_gib} GiB pool, {args.tokens_per_page}-token pages"
    )
    print(
        f"{'model':<14} {'allocator':<8} {'running':>7} {'us/req/step':>11} {'p99':>8} "
        f"{'max call us':>11} {'(call)':<12} {'max decode':>10} {'evicted':>9} {'preempt':>7} "
        f"{'wall s':>7}"
    )
    rows = []
    for model in args.models or EVICTING_MODELS:
        for allocator in args.allocators:
            row = measure_evicting(
                model,
                allocator,
                trace,
                int(args.budget_gib * 2**30),
                args.tokens_per_page,
                args.seed,
            )
            rows.append(row)
            print(
                f"{model:<14} {allocator:<8} {row['mean_running']:7.1f} "
                f"{row['us_per_request_decode_step']:11.2f} "
                f"{row['p99_us_per_request_decode_step']:8.2f} {row['max_call_us']:11.1f} "
                f"{row['max_call']:<12} {row['max_call_us_by_op'].get('allocate', 0):10.1f} "
                f"{row['evicted_pages']:9d} {row['preemptions']:7d} "
                f"{row['wall_s']:7.1f}",
                flush=True,
            )
    return rows


def run_steady(args) -> list[dict]:
    rows = []
    print(
        f"{'model':<16} {'allocator':<8} {'running':>7} {'us/req/step':>11} "
        f"{'us/admit':>9} {'us/free':>8}"
    )
    for model in args.models or DEFAULT_MODELS:
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
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["steady", "evicting"], default="steady")
    p.add_argument("--models", nargs="+", help="default: depends on --mode")
    p.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=ALLOCATORS)
    p.add_argument("--running", nargs="+", type=int, default=[64, 256], help="steady mode")
    p.add_argument("--steps", type=int, default=200, help="steady mode")
    p.add_argument("--requests", type=int, default=500, help="evicting mode")
    p.add_argument("--prompt-mean", type=float, default=2000, help="evicting mode")
    p.add_argument("--output-mean", type=float, default=300, help="evicting mode")
    p.add_argument("--budget-gib", type=float, default=16, help="evicting mode")
    p.add_argument("--tokens-per-page", type=int, default=16, help="evicting mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    rows = run_evicting(args) if args.mode == "evicting" else run_steady(args)
    if args.json:
        with open(args.json, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
