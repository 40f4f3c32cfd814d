"""Memory benchmark: Jenga against uniform paging on real model layouts.

For each model x workload x allocator, run the same seeded trace under one KV budget
(FCFS admission, one decode token per running request per step, preemption of the
newest request on failure) and report how many requests ran at once and how much of
the held memory was waste at the steps where memory was the limit.

    python benchmarks/memory.py                      # every registry model, 3 workloads
    python benchmarks/memory.py --models llama-3.2-11b-vision --workloads mmmu --json out.jsonl
    python benchmarks/memory.py --models gemma-3-27b --trace my_trace.jsonl

Trace files are JSON lines, one request each (see jenga_jax/core/workloads.py:
request_id, prompt_token_ids or prompt_len, output_len, images, arrival, salt, adapter).
Every request arrives at step 0; "mean_run" is over the steps where some request still
waits (saturated), "all_run" over every step including the final drain.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jenga_jax.core import ALLOCATORS, AttentionType, get_layout, model_names
from jenga_jax.core.memory_sim import simulate
from jenga_jax.core.page_plan import make_plan, tpu_alignment
from jenga_jax.core.workloads import load_trace, make_workload

DEFAULT_REQUESTS = {"mmmu": 600, "arxiv-qa": 300, "sharegpt": 1000}
BIND_FACTOR = 4  # the trace holds ~4x the requests that fit at once (ideal packing)
MAX_REQUESTS = 8000


def mean_ideal_bytes(layout, requests) -> float:
    """Mean bytes one request needs at its end (every kind's live tokens, no rounding)."""
    total = 0
    for req in requests:
        n = len(req.prompt_token_ids) + req.output_len
        for g in layout.groups:
            if g.kind.type is AttentionType.STATE:
                total += g.state_bytes
            elif g.kind.type is AttentionType.CROSS:
                total += req.image_tokens * g.bytes_per_token
            else:
                total += (n - g.kind.first_needed_token(n - 1)) * g.bytes_per_token
    return total / max(1, len(requests))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(model_names()))
    p.add_argument("--workloads", nargs="+", default=list(DEFAULT_REQUESTS))
    p.add_argument(
        "--trace", metavar="JSONL", help="replay this trace file instead of the synthetic workloads"
    )
    p.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=ALLOCATORS)
    p.add_argument("--kv-budget-gib", type=float, default=40.0)
    p.add_argument("--tokens-per-page", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=None, help="per workload (default varies)")
    p.add_argument("--state-checkpoint-interval", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tpu-aligned",
        action="store_true",
        help="plan pages as on TPU: tokens per page and state pages in whole tiles "
        "(page_plan.tpu_alignment); the rows say which kinds stay unaligned",
    )
    p.add_argument("--json", metavar="PATH", help="write one JSON object per row (JSON lines)")
    p.add_argument("--plot", metavar="PNG", help="plot held vs needed bytes (needs matplotlib)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = int(args.kv_budget_gib * (1 << 30))
    rows, results = [], []
    header = (
        f"{'model':<22} {'workload':<9} {'allocator':<8} {'mean_run':>8} {'all_run':>7} "
        f"{'peak_run':>8} {'mb_waste':>8} {'mb_peak':>8} {'hit_rate':>8} {'preempt':>7} "
        f"{'steps':>6} {'secs':>6}"
    )
    print(header)
    print("-" * len(header))
    for model in args.models:
        layout = get_layout(model, state_checkpoint_interval=args.state_checkpoint_interval)
        inline = not layout.has(AttentionType.CROSS)
        for workload in [args.trace] if args.trace else args.workloads:
            if args.trace:
                trace = load_trace(args.trace)
            else:
                kwargs = {"inline_images": inline} if workload == "mmmu" else {}
                n = args.num_requests or DEFAULT_REQUESTS.get(workload, 500)
                if not args.num_requests:  # enough requests that the budget binds a while
                    sample = make_workload(workload, 200, seed=args.seed, **kwargs)
                    fit = budget / max(1, mean_ideal_bytes(layout, sample))
                    n = int(min(max(n, BIND_FACTOR * fit), MAX_REQUESTS))
                trace = make_workload(workload, n, seed=args.seed, **kwargs)
            done = {}
            while not args.trace and not args.num_requests and len(trace) < MAX_REQUESTS:
                # Prefix sharing can make the trace fit at once: grow it until memory binds.
                t0 = time.perf_counter()
                first = run(layout, trace, args.allocators[0], budget, args, workload)
                if first.memory_bound_steps:
                    done[args.allocators[0]] = (first, time.perf_counter() - t0)
                    break
                n = min(2 * len(trace), MAX_REQUESTS)
                trace = make_workload(workload, n, seed=args.seed, **kwargs)
            for allocator in args.allocators:
                t0 = time.perf_counter()
                res, secs = done.get(allocator) or (
                    run(layout, trace, allocator, budget, args, workload),
                    time.perf_counter() - t0,
                )
                row = res.row() | {"seconds": round(secs, 2)}
                if args.tpu_aligned:
                    plan = make_plan(
                        layout, allocator, args.tokens_per_page, **_plan_options(layout, args)
                    )
                    row |= {"tpu_aligned": True, "unaligned_kinds": plan.unaligned_kinds()}
                rows.append(row)
                results.append(res)
                print(
                    f"{model:<22} {workload:<9} {allocator:<8} {res.mean_running_requests:8.1f} "
                    f"{res.mean_running_all_steps:7.1f} "
                    f"{res.peak_running_requests:8d} {res.memory_bound_mean_waste:8.2%} "
                    f"{res.memory_bound_peak_waste:8.2%} {res.cache_hit_rate:8.2%} "
                    f"{res.preemptions:7d} {res.steps:6d} {secs:6.1f}",
                    flush=True,
                )
    print()
    print("ratio of mean running requests (jenga / baseline):")
    by_key = {(r["model"], r["workload"], r["allocator"]): r for r in rows}
    for (model, workload, allocator), r in by_key.items():
        if allocator != "jenga":
            continue
        parts = []
        for base in ("paged", "uniform"):
            b = by_key.get((model, workload, base))
            if b and b["mean_running_requests"]:
                parts.append(
                    f"vs {base} {r['mean_running_requests'] / b['mean_running_requests']:.2f}x"
                )
        print(f"  {model:<22} {workload:<9} " + "  ".join(parts))
    if args.json:
        with open(args.json, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")
    if args.plot:
        plot(results, args.plot)
    return 0


def run(layout, trace, allocator, budget, args, workload):
    return simulate(
        layout,
        trace,
        allocator=allocator,
        kv_budget_bytes=budget,
        tokens_per_page=args.tokens_per_page,
        workload=workload,
        seed=args.seed,
        plan_options=_plan_options(layout, args),
    )


def _plan_options(layout, args) -> dict | None:
    """TPU alignment (--tpu-aligned), else the default plan."""
    return tpu_alignment(layout) if args.tpu_aligned else None


def plot(results, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pip install 'jenga-jax[plot]'", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for res in results:
        if not res.trace:
            continue
        steps = [s for s, _, _ in res.trace]
        label = f"{res.model} {res.workload} {res.allocator}"
        ax.plot(steps, [h / 2**30 for _, h, _ in res.trace], label=f"{label} held")
        ax.plot(steps, [n / 2**30 for _, _, n in res.trace], "--", label=f"{label} needed")
    ax.set_xlabel("step (memory-bound steps)")
    ax.set_ylabel("GiB")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
