"""The loop every driver process runs (standard library only: it runs in each peer's venv).

A driver is started as `python drive_<system>.py --checkpoint DIR --trace FILE`. It
loads the system, warms it up (the whole trace once and the batch-1 request, untimed, so
that every shape it will meet is compiled), then answers one JSON line per command read
from stdin:

  {"cmd": "trace"}   -> {"event": "trace", "wall_s", "output_tokens", "tokens": [[...]]}
  {"cmd": "batch1"}  -> {"event": "batch1", "ms_per_token", "prefill_s", "full_s"}
  {"cmd": "quit"}    -> exits

Results go to the original stdout only; everything else the system prints (loggers,
C libraries, child processes) is sent to stderr, which the parent keeps in a log file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import traceback

BATCH1_REPEATS = 3  # per command; the parent takes medians over rounds


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve(load, generate, describe, run_stats=None) -> None:
    """Run the driver loop.

    load(checkpoint_dir, settings) -> engine, built and (where the system has one) its
    own compile step done; generate(engine, prompts, max_tokens) -> one greedy output
    token list per prompt, in order, each exactly max_tokens long (no early stop);
    describe(engine) -> dict of what the system ran with (version, threads, ...);
    run_stats(engine) -> dict added to each timed trace run's reply (optional)."""
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**fields) -> None:
        results.write(json.dumps(fields) + "\n")

    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--trace", required=True)
    args = p.parse_args()
    with open(args.trace) as f:
        trace = json.load(f)
    prompts = [r["prompt"] for r in trace["requests"]]
    max_tokens = [r["max_tokens"] for r in trace["requests"]]
    b1 = trace["batch1"]

    def run_trace(want_tokens: bool) -> dict:
        t = time.perf_counter()
        outs = generate(engine, prompts, max_tokens)
        wall = time.perf_counter() - t
        short = sum(len(o) != m for o, m in zip(outs, max_tokens))
        if short:
            raise RuntimeError(f"{short} requests did not generate exactly max_tokens tokens")
        row = dict(wall_s=wall, output_tokens=sum(len(o) for o in outs))
        if want_tokens:
            row["tokens"] = outs
        if run_stats is not None:
            row.update(run_stats(engine))
        return row

    def run_batch1() -> dict:
        """ms per decoded token at batch 1: (time for 1 + n tokens - time for 1) / n."""

        def timed(n: int) -> float:
            t = time.perf_counter()
            out = generate(engine, [b1["prompt"]], [n])
            if len(out[0]) != n:
                raise RuntimeError(f"batch-1 run generated {len(out[0])} tokens, not {n}")
            return time.perf_counter() - t

        n = b1["max_tokens"]
        first = statistics.median(timed(1) for _ in range(BATCH1_REPEATS))
        full = statistics.median(timed(1 + n) for _ in range(BATCH1_REPEATS))
        return dict(ms_per_token=(full - first) / n * 1e3, prefill_s=first, full_s=full)

    try:
        t0 = time.perf_counter()
        engine = load(args.checkpoint, trace["settings"])
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        run_trace(False)
        run_batch1()
        warmup_s = time.perf_counter() - t1
        reply(
            event="ready",
            load_s=load_s,
            warmup_s=warmup_s,
            max_rss_mib=_max_rss_mib(),
            **describe(engine),
        )
        for line in sys.stdin:
            cmd = json.loads(line)["cmd"]
            if cmd == "trace":
                reply(event="trace", max_rss_mib=_max_rss_mib(), **run_trace(True))
            elif cmd == "batch1":
                reply(event="batch1", **run_batch1())
            elif cmd == "quit":
                break
            else:
                reply(event="error", error=f"unknown command {cmd!r}")
    except Exception as e:  # the parent reports it and skips this system
        traceback.print_exc()
        reply(event="error", error=f"{type(e).__name__}: {e}")
        sys.exit(1)
