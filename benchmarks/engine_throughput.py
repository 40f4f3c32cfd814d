"""Output tokens/s of one engine over issue 18's trace, engine configurations side by side.

    python benchmarks/engine_throughput.py --json engine_throughput.jsonl
    python benchmarks/engine_throughput.py --configs before levels async after --rounds 3

The trace: 128 requests of 100-400 random token ids, 64 greedy output tokens each, all
queued at once, served by the Llama-like float32 model of ``step_profile.py`` (4 layers,
d_model 256, vocab 4096) with max_num_seqs 64, 512 tokens per step, max_model_len 512,
and a pool that never binds. Configurations are those of ``step_profile.py`` (before:
widest block tables and synchronous steps; after: the defaults). Each engine is
warmed up first (not timed); then the configurations run the whole trace in turns,
--rounds times, each from an empty prefix cache. Prints the median output tokens/s
per configuration and its ratio to the first; the generated tokens of every run must
be identical (checked, not assumed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx
from step_profile import CONFIGS, MAX_LEN, model_config

from jenga_jax.engine.llm_engine import Engine
from jenga_jax.engine.sampling import SamplingParams
from jenga_jax.engine.scheduler import SchedulerConfig
from models import HybridDecoder


def trace(num_requests: int, seed: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, vocab, int(rng.integers(100, 401))).tolist() for _ in range(num_requests)
    ]


def run(engine: Engine, prompts, output_len: int) -> tuple[float, list]:
    """Serve the trace once; (seconds, tokens of every request)."""
    engine.manager.reset_cache()
    params = SamplingParams(temperature=0.0, max_tokens=output_len)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    return time.perf_counter() - t0, [o.output_token_ids for o in outs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["before", "after"], choices=list(CONFIGS))
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="append one JSON line per configuration here")
    args = p.parse_args(argv)
    cfg = model_config()
    model = HybridDecoder(cfg, rngs=nnx.Rngs(args.seed))
    prompts = trace(args.requests, args.seed, cfg.vocab_size)
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    engines, info = {}, {}
    for c in args.configs:
        engines[c] = Engine(
            model,
            kv_budget_bytes=2 * args.requests * MAX_LEN * per_token,  # never binds
            max_model_len=MAX_LEN,
            scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=512),
            **CONFIGS[c],
        )
        t0 = time.perf_counter()
        shapes = engines[c].warmup()
        info[c] = dict(step_shapes=shapes, warmup_s=round(time.perf_counter() - t0, 1))
    times = {c: [] for c in args.configs}
    reference = None
    for _ in range(args.rounds):
        for c in args.configs:
            seconds, tokens = run(engines[c], prompts, args.output_len)
            times[c].append(seconds)
            reference = reference or tokens
            if tokens != reference:
                raise SystemExit(f"{c}: tokens differ from {args.configs[0]}'s")
    total = args.requests * args.output_len
    rows = []
    for c in args.configs:
        rows.append({
            "benchmark": "engine_throughput",
            "config": c,
            "requests": args.requests,
            "output_len": args.output_len,
            "max_num_seqs": args.max_num_seqs,
            "rounds": args.rounds,
            "output_tok_s": round(total / statistics.median(times[c]), 1),
            "runs_s": [round(t, 2) for t in times[c]],
            **info[c],
            "tokens_identical": True,
            "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d"),
        })  # fmt: skip
    base = rows[0]["output_tok_s"]
    print("config | output tok/s | vs " + args.configs[0] + " | runs s | step shapes | warmup s")
    for r in rows:
        print(
            f"{r['config']} | {r['output_tok_s']} | {r['output_tok_s'] / base:.2f}x | "
            f"{r['runs_s']} | {r['step_shapes']} | {r['warmup_s']}"
        )
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
