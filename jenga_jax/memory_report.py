"""Memory report: how Jenga packs a model's KV cache against uniform paging (host only:
a simulation on the model's layout, nothing runs on a device).

    jenga-jax report                                  # Llama-3.2-11B-Vision, MMMU-like
    jenga-jax report --model gemma-3-27b --workload sharegpt
    jenga-jax report --config /path/to/checkpoint     # its config.json's layout

The workload defaults to MMMU-like (images) for models with cross attention to images
and ShareGPT-like (text) for the others.
"""

from __future__ import annotations

import argparse

from jenga_jax.arg_types import positive_float, positive_int

WORKLOAD_NAMES = ("arxiv-qa", "image-questions", "mmmu", "sharegpt")  # core.workloads'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama-3.2-11b-vision",
                   help="a model of the registry (jenga_jax.core.model_names())")  # fmt: skip
    p.add_argument("--config", help="a checkpoint directory: the layout from its config.json")
    p.add_argument("--workload", choices=WORKLOAD_NAMES,
                   help="default: mmmu for models with cross attention, else sharegpt")  # fmt: skip
    p.add_argument("--num-requests", type=positive_int, default=400, help="trace length")
    p.add_argument("--kv-budget-gib", type=positive_float, default=40.0, help="KV pool")


def default_workload(layout) -> str:
    from jenga_jax.core import AttentionType

    return "mmmu" if layout.has(AttentionType.CROSS) else "sharegpt"


def run(args) -> dict:
    """Print the report; returns the simulation results per allocator."""
    from jenga_jax.core import ALLOCATORS, AttentionType, get_layout, make_plan, model_names
    from jenga_jax.core.memory_sim import simulate
    from jenga_jax.core.workloads import make_workload

    if args.config:  # the same parser the model loader uses (models.hf; imports JAX)
        from models.hf import decoder_config, read_config

        cfg = decoder_config(read_config(args.config))
        layout = cfg.layout(kv_dtype="bfloat16", checkpoint_interval=512)
    else:
        if args.model not in model_names():
            raise ValueError(f"unknown model {args.model!r}; choose one of {model_names()}")
        layout = get_layout(args.model, state_checkpoint_interval=512)
    workload = args.workload or default_workload(layout)
    print(layout.describe(), "\n")
    for allocator in ALLOCATORS:
        print(make_plan(layout, allocator).describe(), "\n")

    kwargs = {"inline_images": not layout.has(AttentionType.CROSS)} if workload == "mmmu" else {}
    trace = make_workload(workload, args.num_requests, seed=0, **kwargs)
    budget = int(args.kv_budget_gib * (1 << 30))
    print(f"{args.num_requests} {workload}-like requests, KV budget {args.kv_budget_gib:g} GiB")
    print(
        f"{'allocator':<9} {'running (mean)':>14} {'peak':>6} {'waste when memory-bound':>24} "
        f"{'cache hits':>10} {'preemptions':>11}"
    )
    results = {}
    for allocator in ALLOCATORS:
        res = simulate(
            layout, trace, allocator=allocator, kv_budget_bytes=budget, workload=workload
        )
        results[allocator] = res
        print(
            f"{allocator:<9} {res.mean_running_requests:14.1f} {res.peak_running_requests:6d} "
            f"{res.memory_bound_mean_waste:24.2%} {res.cache_hit_rate:10.2%} "
            f"{res.preemptions:11d}"
        )
    jenga = results["jenga"].mean_running_requests
    for base in ("paged", "uniform"):
        other = results[base].mean_running_requests
        if jenga == 0 or other == 0:  # the means are over saturated steps only
            print(
                f"no comparison with {base}: the pool never filled up (no step left a request "
                "waiting); raise --num-requests or lower --kv-budget-gib"
            )
        else:
            print(f"jenga runs {jenga / other:.2f}x the requests of {base} at once")
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
