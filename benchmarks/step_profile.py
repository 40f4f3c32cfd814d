"""Where an engine step's time goes, by phase, and what it copies to the host.

    python benchmarks/step_profile.py --json step_profile.jsonl
    python benchmarks/step_profile.py --running 64 256 --steps 30

A Llama-like float32 model (4 layers, d_model 256, 4 heads of 64, vocab 4096, random
weights) serves R requests at once (prompts of 100-400 random ids, greedy, max_num_seqs
R, 512 tokens per step, max_model_len 512). After warmup (not timed) every prompt is
prefilled, then the steps in which all R requests decode are timed, phase by phase:

  schedule  Scheduler.schedule (admission, token budget, pages in the manager)
  build     ModelRunner.prepare (page table with numpy, sampler rows, device_put)
  dispatch  ModelRunner.dispatch (enqueue the jitted step; JAX dispatch is async)
  device    ModelRunner.fetch_tokens (waiting for the step: model, attention, sampler)
  outputs   the rest of Engine.step (tokens into requests, stop checks, outputs)

and the bytes fetched from the device per step (the sampled token ids). One JSON line
per R with the median ms of each phase over the timed steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import numpy as np
from flax import nnx

from jenga_jax.engine.llm_engine import Engine
from jenga_jax.engine.sampling import SamplingParams
from jenga_jax.engine.scheduler import SchedulerConfig
from models import HybridDecoder, tiny_config

PHASES = ("schedule", "build", "dispatch", "device", "outputs")


def model_config():
    return dataclasses.replace(
        tiny_config("llama"),
        name="llama-256",
        d_model=256,
        num_heads=4,
        num_kv_heads=4,
        head_dim=64,
        mlp_dim=1024,
        vocab_size=4096,
        max_seq_len=512,
    )


class PhaseTimer:
    """Wraps the engine's step phases with perf_counter; sums per step."""

    def __init__(self, engine: Engine):
        self.current = dict.fromkeys(PHASES, 0.0)
        self.fetched_bytes = 0
        runner = engine.runner
        for name, obj, attr in (
            ("schedule", engine.scheduler, "schedule"),
            ("build", runner, "prepare"),
            ("dispatch", runner, "dispatch"),
            ("device", runner, "fetch_tokens"),
        ):
            setattr(obj, attr, self._timed(name, getattr(obj, attr)))
        fetch = runner.fetch_tokens

        def counted(pending, counts):
            self.fetched_bytes += sum(p.nbytes for p in pending)
            return fetch(pending, counts)

        runner.fetch_tokens = counted

    def _timed(self, name, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] += time.perf_counter() - t0

        return run

    def reset(self):
        self.current = dict.fromkeys(PHASES, 0.0)
        self.fetched_bytes = 0


def profile(running: int, steps: int, seed: int) -> dict:
    if not 1 <= steps <= 60:
        raise SystemExit("--steps must be in [1, 60]: requests generate at most 100 tokens")
    cfg = model_config()
    model = HybridDecoder(cfg, rngs=nnx.Rngs(seed))
    engine = Engine(
        model,
        kv_budget_bytes=running * 512 * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4,
        max_model_len=512,
        scheduler=SchedulerConfig(max_num_seqs=running, max_num_batched_tokens=512),
    )
    t0 = time.perf_counter()
    shapes = engine.warmup()
    warmup_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0.0, max_tokens=100)  # none finishes while timed
    for _ in range(running):
        n = int(rng.integers(100, 401))
        engine.add_request(rng.integers(0, cfg.vocab_size, n).tolist(), params)
    while engine.num_waiting or any(  # prefill everything first (not timed)
        engine.manager.num_computed_tokens(r.request_id) < engine.manager.num_tokens(r.request_id)
        for r in engine.scheduler.running
    ):
        engine.step()
    timer = PhaseTimer(engine)
    rows = []
    for _ in range(steps):
        timer.reset()
        t0 = time.perf_counter()
        outs = engine.step()
        total = time.perf_counter() - t0
        assert len(outs) == running, f"expected {running} decode rows, got {len(outs)}"
        phases = dict(timer.current)
        phases["outputs"] = total - sum(phases.values())
        rows.append((total, phases, timer.fetched_bytes))
    med = {p: statistics.median(r[1][p] for r in rows) * 1e3 for p in PHASES}
    return {
        "running": running,
        "model": cfg.name,
        "steps_timed": steps,
        "warmup_s": round(warmup_s, 1),
        "step_shapes": shapes,
        "step_ms": round(statistics.median(r[0] for r in rows) * 1e3, 2),
        **{f"{p}_ms": round(v, 3) for p, v in med.items()},
        "fetched_bytes_per_step": int(statistics.median(r[2] for r in rows)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--running", type=int, nargs="+", default=[64, 256])
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per size (<= 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="append one JSON line per size here")
    args = p.parse_args(argv)
    results = [profile(r, args.steps, args.seed) for r in args.running]
    head = ["running", "step_ms", *(f"{p}_ms" for p in PHASES), "fetched_bytes_per_step"]
    print(" | ".join(head))
    for r in results:
        print(" | ".join(str(r[h]) for h in head))
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
