"""Milliseconds per call of the sampler: the previous full-sort sampler vs `sample_rows`.

For each batch B and vocab V, and each mix of row parameters, both samplers run on the
same logits and keys, interleaved rep by rep; reported: the median ms per call (compile
excluded). The previous sampler sorts the whole vocab for every row whatever the mix, so
its cost does not depend on the mix; shapes above --old-max-elems skip it (one call is
tens of seconds on a CPU). Mixes:

- greedy: T = 0 everywhere (GREEDY);
- top_k50: T = 0.8, top-k 50 (TOP_K);
- temperature: T = 0.8, top-k and top-p off (TEMPERATURE);
- mix_top_p: rows cycling greedy / top-k 50 / temperature, and one row with top_p = 0.9
  over flat logits (its nucleus is wider than max_top_k: FULL_SORT);
- mix_top_p_peaked: the same, the top-p row's logits peaked (nucleus within the
  candidates: NUCLEUS, no sort).

    python benchmarks/sampler.py --json sampler.jsonl
    python benchmarks/sampler.py --batch 64 --vocab 4096 32768 --reps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import numpy as np

from jenga_jax.engine.sampling import sample_full_sort, sample_rows

MIXES = ["greedy", "top_k50", "temperature", "mix_top_p", "mix_top_p_peaked"]


def mix_inputs(mix: str, batch: int, vocab: int, seed: int):
    """(logits [B, V], temperature [B], top_k [B], top_p [B], keys [B]) of a mix."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((batch, vocab), np.float32) * 2  # [B, V]
    kinds = {"greedy": [0], "top_k50": [1], "temperature": [2]}.get(mix, [0, 1, 2])
    kind = np.resize(kinds, batch)  # [B]: 0 greedy, 1 top-k 50, 2 temperature
    temperature = np.where(kind == 0, 0.0, 0.8).astype(np.float32)
    top_k = np.where(kind == 1, 50, 0).astype(np.int32)
    top_p = np.ones(batch, np.float32)
    if mix.startswith("mix_top_p"):
        temperature[0], top_k[0], top_p[0] = 1.0, 0, 0.9
        if mix == "mix_top_p_peaked":
            logits[0, :8] += 40.0  # nearly all the mass on 8 tokens
    keys = jax.random.split(jax.random.key(seed), batch)
    return jax.device_put(logits), temperature, top_k, top_p, keys


def timed_ms(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) * 1e3


def measure(batch: int, vocab: int, reps: int, old_max_elems: int, seed: int) -> list[dict]:
    """Median ms per call of each (mix, sampler) at one shape, interleaved."""
    samplers = {"new": sample_rows}
    if batch * vocab <= old_max_elems:
        samplers["old"] = sample_full_sort
    inputs = {mix: mix_inputs(mix, batch, vocab, seed) for mix in MIXES}
    times = {(mix, name): [] for mix in MIXES for name in samplers}
    for mix in MIXES:  # compile (and warm) outside the timing
        for name, fn in samplers.items():
            if name == "new" or mix == MIXES[0]:
                timed_ms(fn, inputs[mix])
    for _ in range(reps):
        for mix in MIXES:
            for name, fn in samplers.items():
                if name == "old" and mix != MIXES[0]:
                    continue  # mix-independent: timed on the first mix, between the others
                times[mix, name].append(timed_ms(fn, inputs[mix]))
    old = times.get((MIXES[0], "old"), [])
    rows = [(mix, name, times[mix, name] if name == "new" else old) for mix, name in times]
    return [
        dict(
            batch=batch, vocab=vocab, mix=mix, sampler=name, ms=statistics.median(ms), reps=len(ms)
        )  # fmt: skip
        for mix, name, ms in rows
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--vocab", type=int, nargs="+", default=[4096, 32768, 262144])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--old-max-elems", type=int, default=64 * 32768,
                    help="skip the old sampler above B * V elements")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="append one JSON line per (shape, mix, sampler)")
    args = ap.parse_args(argv)
    print(f"{'B':>5} {'V':>7} {'mix':<17} {'old ms':>9} {'new ms':>9} {'speedup':>8}")
    for batch in args.batch:
        for vocab in args.vocab:
            rows = measure(batch, vocab, args.reps, args.old_max_elems, args.seed)
            by = {(r["mix"], r["sampler"]): r["ms"] for r in rows}
            for mix in MIXES:
                new, old = by[mix, "new"], by.get((mix, "old"))
                old_s = f"{old:9.1f}" if old else f"{'-':>9}"
                speed = f"{old / new:7.1f}x" if old else f"{'-':>8}"
                print(f"{batch:5d} {vocab:7d} {mix:<17} {old_s} {new:9.1f} {speed}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    for row in rows:
                        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
