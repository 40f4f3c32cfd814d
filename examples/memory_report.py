"""Memory report: how Jenga packs a real model's KV cache against uniform paging.

python examples/memory_report.py                       # Llama-3.2-11B-Vision, MMMU-like
python examples/memory_report.py --model gemma-3-27b --workload sharegpt
python examples/memory_report.py --config /path/to/checkpoint   # its config.json
"""

from __future__ import annotations

import argparse

from jenga_jax.core import ALLOCATORS, AttentionType, get_layout, make_plan, model_names
from jenga_jax.core.memory_sim import simulate
from jenga_jax.core.workloads import WORKLOADS, make_workload


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.2-11b-vision", choices=model_names())
    p.add_argument("--workload", default="mmmu", choices=sorted(WORKLOADS))
    p.add_argument("--num-requests", type=int, default=400)
    p.add_argument("--kv-budget-gib", type=float, default=40.0)
    p.add_argument("--config", help="a checkpoint directory: the layout from its config.json")
    args = p.parse_args(argv)

    if args.config:  # the same parser the model loader uses (models.hf; imports JAX)
        from models.hf import decoder_config, read_config

        cfg = decoder_config(read_config(args.config))
        layout = cfg.layout(kv_dtype="bfloat16", checkpoint_interval=512)
    else:
        layout = get_layout(args.model, state_checkpoint_interval=512)
    print(layout.describe(), "\n")
    for allocator in ALLOCATORS:
        print(make_plan(layout, allocator).describe(), "\n")

    kwargs = (
        {"inline_images": not layout.has(AttentionType.CROSS)} if args.workload == "mmmu" else {}
    )
    trace = make_workload(args.workload, args.num_requests, seed=0, **kwargs)
    budget = int(args.kv_budget_gib * (1 << 30))
    print(
        f"{args.num_requests} {args.workload}-like requests, KV budget {args.kv_budget_gib:g} GiB"
    )
    print(
        f"{'allocator':<9} {'running (mean)':>14} {'peak':>6} {'waste when memory-bound':>24} "
        f"{'cache hits':>10} {'preemptions':>11}"
    )
    results = {}
    for allocator in ALLOCATORS:
        res = simulate(
            layout, trace, allocator=allocator, kv_budget_bytes=budget, workload=args.workload
        )
        results[allocator] = res
        print(
            f"{allocator:<9} {res.mean_running_requests:14.1f} {res.peak_running_requests:6d} "
            f"{res.memory_bound_mean_waste:24.2%} {res.cache_hit_rate:10.2%} "
            f"{res.preemptions:11d}"
        )
    jenga = results["jenga"].mean_running_requests
    for base in ("paged", "uniform"):
        print(
            f"jenga runs {jenga / max(results[base].mean_running_requests, 1e-9):.2f}x the "
            f"requests of {base} at once"
        )


if __name__ == "__main__":
    main()
