"""Memory of the compiled jitted steps: is the pool updated in place?

For each tiny family, a pool of at least --pool-mib MiB, one request prefilled then
one decode step; from XLA's memory analysis of the compiled steps: the bytes aliased
between the donated pool argument and the output pool, and the temporaries. A last
row measures the design not taken: float32 states viewed in a bfloat16 pool by bitcast.

python benchmarks/step_memory.py [--pool-mib 64] [--json step_memory.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jenga_jax.core import make_plan
from jenga_jax.engine.model_runner import Image, ModelRunner, Work
from models import FAMILIES, HybridDecoder, tiny_config

MIB = 2**20


def measure(family: str, pool_mib: float, prompt_len: int) -> list[dict]:
    cfg = tiny_config(family)
    plan = make_plan(cfg.layout(cfg.dtype))
    runner = ModelRunner(
        HybridDecoder(cfg, rngs=nnx.Rngs(0)),
        num_large_pages=math.ceil(pool_mib * MIB / plan.large_page_bytes),
    )
    images = []
    if cfg.vision_dim:
        images = [Image("img", np.ones((20, cfg.vision_dim), np.float32))]
    runner.add_request("a", list(range(1, prompt_len + 1)), images=images, max_new_tokens=4)
    rows_out = []
    for decode, work in ((False, Work("a", prompt_len)), (True, Work("a", 1, (7,)))):
        rows, _ = runner.allocate([work])
        step = runner.prepare(rows, decode=decode)
        mem = step.fn.lower(runner.params, runner.pool, step.table, step.inputs).compile()
        mem = mem.memory_analysis()
        rows_out.append(
            dict(
                family=family,
                step="decode" if decode else f"prefill {prompt_len}",
                pool_mib=runner.layout.nbytes / MIB,
                alias_mib=mem.alias_size_in_bytes / MIB,
                temp_mib=mem.temp_size_in_bytes / MIB,
                temp_pct_of_pool=100 * mem.temp_size_in_bytes / runner.layout.nbytes,
                backend=jax.default_backend(),
                jax=jax.__version__,
            )
        )
        runner.execute(step)
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
        step="state write",
        pool_mib=pool.nbytes / MIB,
        alias_mib=mem.alias_size_in_bytes / MIB,
        temp_mib=mem.temp_size_in_bytes / MIB,
        temp_pct_of_pool=100 * mem.temp_size_in_bytes / pool.nbytes,
        backend=jax.default_backend(),
        jax=jax.__version__,
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool-mib", type=float, default=64.0)
    p.add_argument("--prompt-len", type=int, default=40)
    p.add_argument("--json", help="write one JSON line per row here")
    args = p.parse_args(argv)
    rows = [r for f in sorted(FAMILIES) for r in measure(f, args.pool_mib, args.prompt_len)]
    rows.append(bitcast_state_view(args.pool_mib))
    print(f"{'family':<28}{'step':<13}{'pool MiB':>10}{'aliased MiB':>13}", end="")
    print(f"{'temp MiB':>10}{'temp %':>8}")
    for r in rows:
        print(
            f"{r['family']:<28}{r['step']:<13}{r['pool_mib']:>10.2f}{r['alias_mib']:>13.2f}"
            f"{r['temp_mib']:>10.3f}{r['temp_pct_of_pool']:>8.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
