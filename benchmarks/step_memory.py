"""Memory and time of the compiled jitted steps: is the pool updated in place?

For each tiny family and pool dtype (float32, bfloat16), a pool of at least --pool-mib
MiB, one request prefilled then one decode step; from XLA's memory analysis of the
compiled steps: the bytes aliased between the donated pool argument and the output
pool, and the temporaries. A last memory row measures the design not taken: float32
states viewed in a bfloat16 pool by bitcast. Then the time of one family's prefill and
decode steps (median of --calls calls after a warm-up, the sizes called in turn) at
each of --time-pools: an in-place step does not slow down as the pool grows.

python benchmarks/step_memory.py [--pool-mib 64] [--dtypes float32,bfloat16]
    [--time-family llama] [--time-pools 64,1024] [--calls 15] [--json step_memory.jsonl]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jenga_jax.core import make_plan
from jenga_jax.engine.model_runner import Image, ModelRunner, Work
from models import FAMILIES, HybridDecoder, tiny_config

MIB = 2**20


def _runner(family: str, dtype: str, pool_mib: float, prompt_len: int) -> ModelRunner:
    """A runner over a pool of at least pool_mib MiB, request "a" added."""
    cfg = dataclasses.replace(tiny_config(family), dtype=dtype)
    plan = make_plan(cfg.layout(cfg.dtype))
    runner = ModelRunner(
        HybridDecoder(cfg, rngs=nnx.Rngs(0)),
        num_large_pages=math.ceil(pool_mib * MIB / plan.large_page_bytes),
    )
    images = []
    if cfg.vision_dim:
        images = [Image("img", np.ones((20, cfg.vision_dim), np.float32))]
    runner.add_request("a", list(range(1, prompt_len + 1)), images=images, max_new_tokens=4)
    return runner


def _work(prompt_len: int):
    """(decode, work) of the prefill of the whole prompt, then of one decode step."""
    return ((False, Work("a", prompt_len)), (True, Work("a", 1, (7,))))


def _env() -> dict:
    return dict(backend=jax.default_backend(), jax=jax.__version__)


def measure(family: str, pool_mib: float, prompt_len: int, dtype: str = "float32") -> list[dict]:
    runner = _runner(family, dtype, pool_mib, prompt_len)
    rows_out = []
    for decode, work in _work(prompt_len):
        rows, _ = runner.allocate([work])
        step = runner.prepare(rows, decode=decode)
        mem = step.fn.lower(runner.params, runner.pool, step.table, step.inputs).compile()
        mem = mem.memory_analysis()
        rows_out.append(
            dict(
                family=family,
                dtype=dtype,
                step="decode" if decode else f"prefill {prompt_len}",
                pool_mib=runner.layout.nbytes / MIB,
                alias_mib=mem.alias_size_in_bytes / MIB,
                temp_mib=mem.temp_size_in_bytes / MIB,
                temp_pct_of_pool=100 * mem.temp_size_in_bytes / runner.layout.nbytes,
                **_env(),
            )
        )
        runner.execute(step)
    return rows_out


def time_steps(family: str, dtype: str, pool_mibs, prompt_len: int, calls: int) -> list[dict]:
    """Wall time of the prefill and the decode step at each pool size: after one warm-up
    call each, `calls` rounds that call every pool's step once in turn (so that a load
    change on the machine hits every size alike), the pool threaded through, donated."""
    runners = [_runner(family, dtype, mib, prompt_len) for mib in pool_mibs]
    rows_out = []
    for decode, work in _work(prompt_len):
        steps = []
        for runner in runners:
            rows, _ = runner.allocate([work])
            steps.append(runner.prepare(rows, decode=decode))
        times = [[] for _ in runners]
        for i in range(calls + 1):  # call 0 compiles and warms up
            for runner, step, ts in zip(runners, steps, times):
                t0 = time.perf_counter()
                out, runner.pool = step.fn(runner.params, runner.pool, step.table, step.inputs)
                jax.block_until_ready((out, runner.pool))
                if i:
                    ts.append(time.perf_counter() - t0)
        for runner, ts in zip(runners, times):
            rows_out.append(
                dict(
                    family=family,
                    dtype=dtype,
                    step="decode" if decode else f"prefill {prompt_len}",
                    pool_mib=runner.layout.nbytes / MIB,
                    median_ms=1e3 * statistics.median(ts),
                    min_ms=1e3 * min(ts),
                    calls=calls,
                    **_env(),
                )
            )
    return rows_out


def bitcast_state_view(pool_mib: float) -> dict:
    """The alternative not taken: float32 states in a bfloat16 pool through a bitcast
    view (pairs of bf16 elements as one f32), one state read and written in place."""
    n, e = int(pool_mib * MIB) // (2 * 2048), 2048

    def step(pool, idx, val):
        states = jax.lax.bitcast_convert_type(pool.reshape(n, e // 2, 2), jnp.float32)
        states = states.at[idx].set(states[idx] * 0.5 + val)  # [n, e / 2] float32
        return jax.lax.bitcast_convert_type(states, jnp.bfloat16).reshape(n, e)

    pool = jnp.zeros((n, e), jnp.bfloat16)
    args = (pool, jnp.array([3, 5], jnp.int32), jnp.ones((2, e // 2)))
    mem = jax.jit(step, donate_argnums=0).lower(*args).compile().memory_analysis()
    return dict(
        family="(bf16 pool as f32 states)",
        dtype="bfloat16",
        step="state write",
        pool_mib=pool.nbytes / MIB,
        alias_mib=mem.alias_size_in_bytes / MIB,
        temp_mib=mem.temp_size_in_bytes / MIB,
        temp_pct_of_pool=100 * mem.temp_size_in_bytes / pool.nbytes,
        **_env(),
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool-mib", type=float, default=64.0)
    p.add_argument("--prompt-len", type=int, default=40)
    p.add_argument("--dtypes", default="float32,bfloat16", help="pool dtypes, comma-separated")
    p.add_argument("--families", default=",".join(sorted(FAMILIES)))
    p.add_argument("--time-family", default="llama", help="'' skips the timing")
    p.add_argument("--time-dtype", default="bfloat16")
    p.add_argument("--time-pools", default="64,1024", help="pool sizes in MiB to time")
    p.add_argument("--calls", type=int, default=15)
    p.add_argument("--json", help="write one JSON line per row here")
    args = p.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]  # "": no memory rows
    families = [f for f in args.families.split(",") if f]
    rows = [
        r for d in dtypes for f in families for r in measure(f, args.pool_mib, args.prompt_len, d)
    ]
    if rows:
        rows.append(bitcast_state_view(args.pool_mib))
    if rows:
        print(f"{'family':<28}{'dtype':<10}{'step':<13}{'pool MiB':>10}", end="")
        print(f"{'aliased MiB':>13}{'temp MiB':>10}{'temp %':>8}")
    for r in rows:
        print(
            f"{r['family']:<28}{r['dtype']:<10}{r['step']:<13}{r['pool_mib']:>10.2f}"
            f"{r['alias_mib']:>13.2f}{r['temp_mib']:>10.3f}{r['temp_pct_of_pool']:>8.2f}"
        )
    timed = []
    if args.time_family:
        mibs = [float(m) for m in args.time_pools.split(",")]
        timed = time_steps(args.time_family, args.time_dtype, mibs, args.prompt_len, args.calls)
        print(f"\n{'family':<14}{'dtype':<10}{'step':<13}{'pool MiB':>10}", end="")
        print(f"{'median ms':>11}{'min ms':>9}{'x smallest':>12}")
        for r in timed:
            base = next(t for t in timed if t["step"] == r["step"])["median_ms"]
            r["ratio_to_smallest_pool"] = r["median_ms"] / base
            print(
                f"{r['family']:<14}{r['dtype']:<10}{r['step']:<13}{r['pool_mib']:>10.1f}"
                f"{r['median_ms']:>11.2f}{r['min_ms']:>9.2f}{r['ratio_to_smallest_pool']:>12.2f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            for r in rows + timed:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
