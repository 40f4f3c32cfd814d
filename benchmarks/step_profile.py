"""Where an engine step's time goes, by phase, and what it copies to the host.

    python benchmarks/step_profile.py --json step_profile.jsonl
    python benchmarks/step_profile.py --running 64 256 --prompts 100-400
    python benchmarks/step_profile.py --running 64 --prompts 24 80 200 400   # cost vs context

A Llama-like float32 model (4 layers, d_model 256, 4 heads of 64, vocab 4096, random
weights) serves R requests at once (prompts of LO-HI random ids, greedy, max_num_seqs R,
512 tokens per step, max_model_len 512). Each engine configuration (--configs):

  before  every step at the widest block table, host work after the device's
          (block_table_levels=1, async_scheduling=False: the engine before issue 18's
          items 3 and 4)
  after   the engine's defaults (block-table levels, asynchronous scheduling)
  levels  block-table levels only;  async  asynchronous scheduling only

is warmed up (not timed); for each prompt range (--prompts) it serves R new requests
and prefills them (not timed); then the configurations take turns, --rounds times,
each timing --steps steps in which all R requests decode, phase by phase:

  schedule  Scheduler.schedule (admission, token budget, pages in the manager)
  build     ModelRunner.prepare (page table with numpy, sampler rows, device_put)
  dispatch  ModelRunner.dispatch (enqueue the jitted step and sampler; async)
  device    ModelRunner.fetch_tokens (waiting for a step: model, attention, sampler;
            with async scheduling the previous step, which ran while the host worked)
  outputs   the rest of Engine.step (tokens into requests, stop checks, outputs)

plus `sample`: the device sampler alone at this batch (greedy rows, timed apart), the
bytes fetched from the device per step (the sampled token ids), and the block-table
widths the timed steps used. One JSON line per (R, prompts, configuration) with the
median ms of each phase over its timed steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from jenga_jax.engine.llm_engine import Engine
from jenga_jax.engine.sampling import SamplerBatch, SamplingParams
from jenga_jax.engine.scheduler import SchedulerConfig
from jenga_jax.engine.steps import SamplerInputs, sample_on_device
from models import HybridDecoder, tiny_config

PHASES = ("schedule", "build", "dispatch", "device", "outputs")
CONFIGS = {  # Engine options of each configuration
    "before": dict(block_table_levels=1, async_scheduling=False),
    "levels": dict(async_scheduling=False),
    "async": dict(block_table_levels=1),
    "after": dict(),
}
MAX_LEN = 512
MAX_TOKENS = 100  # none finishes while timed: at most 60 steps are timed


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
        max_seq_len=MAX_LEN,
    )


class PhaseTimer:
    """Wraps the engine's step phases with perf_counter; sums per step. Also records
    the bytes fetched and the block-table widths of the dispatched steps."""

    def __init__(self, engine: Engine):
        self.current = dict.fromkeys(PHASES, 0.0)
        self.fetched_bytes = 0
        self.widths: set[int] = set()
        runner = engine.runner
        for name, obj, attr in (
            ("schedule", engine.scheduler, "schedule"),
            ("build", runner, "prepare"),
            ("dispatch", runner, "dispatch"),
            ("device", runner, "fetch_tokens"),
        ):
            setattr(obj, attr, self._timed(name, getattr(obj, attr)))
        fetch, prepare = runner.fetch_tokens, runner.prepare

        def counted(pending, counts):
            self.fetched_bytes += sum(p.nbytes for p in pending)
            return fetch(pending, counts)

        def watched(rows, **kw):
            step = prepare(rows, **kw)
            self.widths.add(step.table.kinds[0].block_tables.shape[1])
            return step

        runner.fetch_tokens, runner.prepare = counted, watched

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


def start(config: str, running: int, seed: int):
    """An engine of `config`, warmed up."""
    cfg = model_config()
    model = HybridDecoder(cfg, rngs=nnx.Rngs(seed))
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    engine = Engine(
        model,
        kv_budget_bytes=running * MAX_LEN * per_token,
        max_model_len=MAX_LEN,
        scheduler=SchedulerConfig(max_num_seqs=running, max_num_batched_tokens=512),
        **CONFIGS[config],
    )
    t0 = time.perf_counter()
    shapes = engine.warmup()
    return engine, dict(warmup_s=round(time.perf_counter() - t0, 1), step_shapes=shapes)


def load(engine: Engine, running: int, prompts: tuple[int, int], seed: int) -> None:
    """Replace the engine's requests by `running` new ones and prefill them all."""
    for rid in list(engine._requests):
        engine.abort(rid)
    while engine.step():  # async: the step still in flight
        pass
    engine.manager.reset_cache()
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    lo, hi = prompts
    for _ in range(running):
        n = int(rng.integers(lo, hi + 1))
        engine.add_request(rng.integers(0, engine.cfg.vocab_size, n).tolist(), params)
    while engine.num_waiting or any(  # prefill everything first (not timed)
        engine.manager.num_computed_tokens(r.request_id) < engine.manager.num_tokens(r.request_id)
        for r in engine.scheduler.running
    ):
        engine.step()
    engine.step()  # async: the last prefill's tokens come out with this step


def time_steps(engine: Engine, timer: PhaseTimer, steps: int, running: int) -> list:
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
    return rows


def sample_ms(running: int, vocab: int, repeats: int = 20) -> float:
    """The device sampler alone on [running, vocab] float32 logits, greedy rows."""
    logits = jax.device_put(
        np.random.default_rng(0).normal(size=(running, vocab)).astype(np.float32)
    )
    batch = SamplerBatch.build(
        [SamplingParams(temperature=0.0)] * running, [1] * running, [""] * running,
        vocab_size=vocab, engine_seed=0,
    )  # fmt: skip
    inputs = jax.device_put(SamplerInputs.from_batch(batch))
    jax.block_until_ready(sample_on_device(logits, inputs))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(sample_on_device(logits, inputs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def profile(running: int, prompt_ranges, configs, steps: int, rounds: int, seed: int):
    if not 1 <= steps * rounds <= 60:
        raise SystemExit(f"--steps x --rounds must be in [1, 60]: requests generate {MAX_TOKENS}")
    if max(hi for _, hi in prompt_ranges) + MAX_TOKENS > MAX_LEN:
        raise SystemExit(f"prompts must be at most {MAX_LEN - MAX_TOKENS} tokens")
    engines = {c: start(c, running, seed) for c in configs}
    timers = {c: PhaseTimer(engines[c][0]) for c in configs}
    sampler = round(sample_ms(running, model_config().vocab_size), 3)
    results = []
    for prompts in prompt_ranges:
        for c in configs:
            load(engines[c][0], running, prompts, seed)
            timers[c].widths.clear()
        timed = {c: [] for c in configs}
        for _ in range(rounds):  # the configurations take turns
            for c in configs:
                timed[c] += time_steps(engines[c][0], timers[c], steps, running)
        for c in configs:
            rows = timed[c]
            med = {p: statistics.median(r[1][p] for r in rows) * 1e3 for p in PHASES}
            results.append({
                "running": running,
                "prompts": f"{prompts[0]}-{prompts[1]}",
                "config": c,
                "model": model_config().name,
                "steps_timed": len(rows),
                **engines[c][1],
                "step_ms": round(statistics.median(r[0] for r in rows) * 1e3, 2),
                **{f"{p}_ms": round(v, 3) for p, v in med.items()},
                "sample_ms": sampler,
                "fetched_bytes_per_step": int(statistics.median(r[2] for r in rows)),
                "block_table_pages": sorted(timers[c].widths),
                "jax": jax.__version__,
                "date": time.strftime("%Y-%m-%d"),
            })  # fmt: skip
    return results


def _prompts(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--running", type=int, nargs="+", default=[64, 256])
    p.add_argument("--prompts", nargs="+", default=["100-400"], help="LO-HI or N tokens")
    p.add_argument("--configs", nargs="+", default=["before", "after"], choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=5, help="timed steps per turn")
    p.add_argument("--rounds", type=int, default=4, help="turns of every configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="append one JSON line per row here")
    args = p.parse_args(argv)
    ranges = [_prompts(text) for text in args.prompts]
    results = [
        row
        for r in args.running
        for row in profile(r, ranges, args.configs, args.steps, args.rounds, args.seed)
    ]
    head = ["running", "prompts", "config", "step_ms", *(f"{p}_ms" for p in PHASES)]
    head += ["sample_ms", "fetched_bytes_per_step", "block_table_pages", "step_shapes", "warmup_s"]
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
