"""End-to-end serving throughput: one engine, model and seeded trace, the allocator swapped.

python benchmarks/serving.py                              # the three rows below, on CPU
python benchmarks/serving.py --json serving.jsonl         # + one JSON line per timed run
python benchmarks/serving.py --scenarios llama-vision-mmmu --allocators jenga paged

Every scenario runs jenga, paged and uniform under one KV budget (bytes), in one
process: each engine is warmed up first (compilation is not timed; `compilations`
counts what compiled during a timed run, 0 expected), then the runs interleave
(jenga, paged, uniform, jenga, ...), each from an empty prefix cache. The table shows
each allocator's median run; the ratio line also lists the per-repeat ratios. The
tokens each allocator generates are compared: greedy decoding of the same trace must
give the same tokens whatever the allocator (a mismatch is reported, not hidden).

Scenarios (tiny models with random weights; the traces are scaled-down versions of the
memory benchmark's workloads so that a CPU runs them in minutes):
  llama-vision-mmmu  Llama-3.2-Vision-like, MMMU-like: one ~576-token image + ~24 text
                     tokens + ~32 output tokens per request;
  gemma3-sharegpt    Gemma-3-like (5 sliding : 1 full), ShareGPT-like chat turns of
                     ~200 tokens (those longer than max_model_len are left out, said);
  jamba-sharegpt     Jamba-like (Mamba + attention), the same chat turns.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from flax import nnx

from jenga_jax.core.workloads import make_workload
from jenga_jax.engine.aot import wide_config
from jenga_jax.engine.llm_engine import Engine
from jenga_jax.engine.scheduler import SchedulerConfig
from jenga_jax.engine.serving import format_table, run_trace
from models import HybridDecoder, tiny_config
from models.random_init import perturb

ALLOCATORS = ("jenga", "paged", "uniform")


@dataclasses.dataclass(frozen=True)
class Scenario:
    family: str
    workload: str
    workload_options: dict
    kv_budget_mib: float
    max_model_len: int
    max_encoder_tokens: int | None = None
    checkpoint_interval: int | None = None  # state kinds: prefix hits at checkpoints


SCENARIOS = {
    "llama-vision-mmmu": Scenario(
        "llama-vision",
        "mmmu",
        dict(image_tokens_mean=576, image_tokens_std=32, text_tokens_mean=24, output_len_mean=32),
        kv_budget_mib=3.0,
        max_model_len=192,
        max_encoder_tokens=704,
    ),
    "gemma3-sharegpt": Scenario(
        "gemma3",
        "sharegpt",
        dict(total_tokens_mean=200),
        kv_budget_mib=1.0,
        max_model_len=512,
    ),
    "jamba-sharegpt": Scenario(
        "jamba",
        "sharegpt",
        dict(total_tokens_mean=200),
        kv_budget_mib=0.5,
        max_model_len=512,
        checkpoint_interval=64,
    ),
}


def run_scenario(name: str, args) -> list:
    sc = SCENARIOS[name]
    cfg = tiny_config(sc.family)
    budget = sc.kv_budget_mib * 2**20
    if args.width == "real":  # d_model 1024, 32 / 8 heads of 128; the budget scaled with K/V
        wide = wide_config(sc.family, cfg.dtype)
        budget *= (wide.num_kv_heads * wide.head_dim) / (cfg.num_kv_heads * cfg.head_dim)
        cfg = wide
    model = perturb(HybridDecoder(cfg, rngs=nnx.Rngs(args.seed)), seed=args.seed)
    trace = make_workload(
        sc.workload,
        args.requests,
        seed=args.seed,
        vocab_size=cfg.vocab_size,
        **sc.workload_options,
    )
    fits = [r for r in trace if len(r.prompt_token_ids) + r.output_len <= sc.max_model_len]
    if len(fits) < len(trace):
        print(
            f"  {name}: {len(trace) - len(fits)} of {len(trace)} requests are longer than "
            f"max_model_len {sc.max_model_len} and left out",
            file=sys.stderr,
        )
    trace = fits
    engines = {}
    for allocator in args.allocators:
        engines[allocator] = Engine(
            model,
            kv_budget_bytes=int(budget),
            allocator=allocator,
            scheduler=SchedulerConfig(
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens
            ),
            max_model_len=sc.max_model_len,
            max_encoder_tokens=sc.max_encoder_tokens,
            checkpoint_interval=sc.checkpoint_interval,
            seed=args.seed,
        )
        engines[allocator].warmup()
    runs = {a: [] for a in args.allocators}
    tokens = {}
    for repeat in range(args.repeats):  # interleaved, so that noise hits every allocator
        for allocator, engine in engines.items():
            engine.manager.reset_cache()  # every run starts from an empty cache
            outputs = {}
            report = run_trace(engine, trace, workload=sc.workload, on_output=outputs.__setitem__)
            runs[allocator].append(report)
            tokens.setdefault(allocator, outputs)
            print(f"  {name} #{repeat} {allocator}: {report.duration_s:.2f} s", file=sys.stderr)
    base = tokens[args.allocators[0]]
    for allocator, outs in tokens.items():
        same = sum(outs[r] == base[r] for r in base)
        if same != len(base):
            print(
                f"  note: {allocator} generated different tokens than {args.allocators[0]} "
                f"for {len(base) - same} of {len(base)} requests",
                file=sys.stderr,
            )
    return runs


def median_run(reports):
    """The run with the median throughput (runs differ only by timing noise)."""
    ordered = sorted(reports, key=lambda r: r.tokens_per_s)
    return ordered[(len(ordered) - 1) // 2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=ALLOCATORS)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per allocator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="append one JSON line per run to this file")
    p.add_argument(
        "--width",
        choices=["tiny", "real"],
        default="tiny",
        help="the scenarios' tiny models, or their layer patterns at a real attention width "
        "(d_model 1024, 32 query / 8 KV heads of 128; for accelerators)",
    )
    args = p.parse_args(argv)
    for name in args.scenarios:
        sc = SCENARIOS[name]
        runs = run_scenario(name, args)
        reports = [median_run(rs) for rs in runs.values()]
        print(
            f"\n{name}: {args.requests} requests, KV budget {sc.kv_budget_mib} MiB, "
            f"median of {args.repeats} runs"
        )
        print(format_table(reports))
        if "jenga" in runs and "paged" in runs:
            j, g = runs["jenga"], runs["paged"]
            batch = j[0].mean_batch_size / g[0].mean_batch_size
            ratios = sorted(a.tokens_per_s / b.tokens_per_s for a, b in zip(j, g))
            print(
                f"jenga / paged: mean batch size {batch:.2f}x, throughput "
                f"{median_run(j).tokens_per_s / median_run(g).tokens_per_s:.2f}x "
                f"(per repeat: {', '.join(f'{x:.2f}' for x in ratios)})"
            )
        if args.json:
            with open(args.json, "a") as f:
                for rs in runs.values():
                    for repeat, r in enumerate(rs):
                        f.write(json.dumps({"scenario": name, "repeat": repeat, **r.row()}) + "\n")


if __name__ == "__main__":
    main()
