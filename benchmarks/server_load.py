"""The server under load, loopback only: many concurrent streaming clients, some of
which hang up midway, against the offline engine on the same trace.

python benchmarks/server_load.py                      # 200 clients, a tenth disconnect
python benchmarks/server_load.py --clients 64 --rounds 3 --json load.jsonl

One process: a tiny random checkpoint (``jenga_jax.demo_checkpoint``), one engine,
warmed up first (compilation is not timed). Then, interleaved for --rounds rounds:
  offline  ``Engine.generate`` on the trace, on the engine's own thread;
  server   every request of the trace as a streaming /v1/completions client at once
           (raw asyncio HTTP/1.1, ``jenga_jax.server.load_client``), none leaving.
Both are greedy, so each request's tokens must be identical in both (checked: none
lost, none duplicated, none different). Last, the disconnect run: the same clients, a
tenth of them hanging up after a few events; afterwards no request runs, no page is
held by a request, and the manager's invariants hold (checked). Tokens/s counts
generated tokens over the wall time of the whole trace; the table shows medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import uvicorn

from jenga_jax.core.invariants import check_manager
from jenga_jax.demo_checkpoint import VOCAB_SIZE, write_demo_checkpoint
from jenga_jax.engine.sampling import SamplingParams
from jenga_jax.loading import EngineOptions, load_engine
from jenga_jax.server.api import build_app
from jenga_jax.server.launch import ServerOptions, build_server_state
from jenga_jax.server.load_client import stream_completion

NAME = "tiny"


def make_trace(n: int, seed: int, max_tokens: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens): prompts of 8-64 ids, a shared 16-token system
    prefix on half of them (prefix-cache hits), outputs of max_tokens/2..max_tokens."""
    rng = np.random.default_rng(seed)
    system = rng.integers(4, VOCAB_SIZE, 16).tolist()
    trace = []
    for i in range(n):
        body = rng.integers(4, VOCAB_SIZE, int(rng.integers(8, 49))).tolist()
        prompt = ([1] + system + body) if i % 2 else ([1] + body)
        trace.append((prompt, int(rng.integers(max_tokens // 2, max_tokens + 1))))
    return trace


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _clients(port: int, trace, disconnect_every: int | None):
    tasks = []
    for i, (prompt, n) in enumerate(trace):
        body = {"model": NAME, "prompt": prompt, "max_tokens": n, "temperature": 0.0,
                "stop_token_ids": []}  # fmt: skip
        leave = disconnect_every is not None and i % disconnect_every == 0
        tasks.append(
            stream_completion("127.0.0.1", port, body, disconnect_after=3 if leave else None)
        )
    return await asyncio.gather(*tasks)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=200, help="requests of the trace, all at once")
    p.add_argument("--max-tokens", type=int, default=32, help="most output tokens per request")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--kv-budget-mib", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--disconnect-every", type=int, default=10, help="every k-th client leaves")
    p.add_argument("--json", metavar="PATH", help="write one JSON object per row (JSON lines)")
    args = p.parse_args(argv)
    for name in ("clients", "max_tokens", "max_num_seqs", "rounds", "disconnect_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    logging.basicConfig(level=logging.WARNING)

    path = os.path.join(tempfile.mkdtemp(), NAME)
    write_demo_checkpoint(path)
    options = EngineOptions(
        max_model_len=128, kv_budget_bytes=int(args.kv_budget_mib * 2**20),
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
    )  # fmt: skip
    engine, _ = load_engine(path, options)
    t0 = time.perf_counter()
    engine.warmup()
    print(f"warmup: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    state = build_server_state(
        engine, path, ServerOptions(served_model_name=NAME, max_queued_requests=4 * args.clients)
    )
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    loop = state.loop
    trace = make_trace(args.clients, 0, args.max_tokens)
    prompts = [t[0] for t in trace]
    params = [SamplingParams(temperature=0.0, max_tokens=n) for _, n in trace]

    def offline():
        t = time.perf_counter()
        outs = loop.call_sync(lambda e: e.generate(prompts, params))
        return time.perf_counter() - t, [list(o.output_token_ids) for o in outs]

    def online(disconnect_every=None):
        t = time.perf_counter()
        results = asyncio.run(_clients(port, trace, disconnect_every))
        return time.perf_counter() - t, results

    rows, mismatches = [], 0
    for r in range(args.rounds):
        reset = loop.call_sync(lambda e: e.manager.reset_cache())  # each run from a cold cache
        off_s, want = offline()
        loop.call_sync(lambda e: e.manager.reset_cache())
        on_s, results = online()
        lost = sum(res.status != 200 or res.finish_reason is None for res in results)
        mismatches += sum(res.token_ids != w for res, w in zip(results, want)) + lost
        tokens = sum(len(w) for w in want)
        served = sum(len(res.token_ids) for res in results)
        rows.append(dict(round=r, tokens=tokens, served_tokens=served, offline_s=off_s,
                         server_s=on_s, offline_tok_s=tokens / off_s, server_tok_s=served / on_s,
                         ratio=(served / on_s) / (tokens / off_s), lost=lost))  # fmt: skip
        del reset

    # the disconnect run
    loop.call_sync(lambda e: e.manager.reset_cache())
    d_s, results = online(args.disconnect_every)
    left = sum(r.disconnected for r in results)
    finished = [(r, w) for r, w in zip(results, want) if not r.disconnected]
    bad = sum(r.status != 200 or r.token_ids != w for r, w in finished)
    while loop.call_sync(lambda e: e.has_unfinished()):
        time.sleep(0.05)

    def after(engine):
        check_manager(engine.manager)
        return engine.manager.stats()

    stats = loop.call_sync(after)
    server.should_exit = True
    thread.join(60)

    print(f"\n{args.clients} streaming clients, {NAME} (random weights), "
          f"max_num_seqs {args.max_num_seqs}, {args.rounds} interleaved rounds")  # fmt: skip
    print(
        f"{'round':>5} {'tokens':>7} {'offline tok/s':>14} {'server tok/s':>13} "
        f"{'server/offline':>15}"
    )
    for row in rows:
        print(f"{row['round']:>5} {row['tokens']:>7} {row['offline_tok_s']:>14.1f} "
              f"{row['server_tok_s']:>13.1f} {row['ratio']:>15.3f}")  # fmt: skip
    med = {
        k: statistics.median(r[k] for r in rows) for k in ("offline_tok_s", "server_tok_s", "ratio")
    }
    print(f"{'median':>5} {'':>7} {med['offline_tok_s']:>14.1f} {med['server_tok_s']:>13.1f} "
          f"{med['ratio']:>15.3f}")  # fmt: skip
    print(f"token mismatches or lost requests over all rounds: {mismatches}")
    print(f"disconnect run: {left} of {len(results)} clients left after 3 events; "
          f"{len(finished) - bad} of {len(finished)} others got every token exactly once "
          f"({d_s:.1f} s); afterwards {stats.num_running} running, "
          f"{stats.running_bytes} B held by requests, invariants hold")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            for row in rows:
                f.write(json.dumps({"bench": "server_load", **row}) + "\n")
            f.write(json.dumps({
                "bench": "server_load", "run": "disconnect", "clients": len(results),
                "left": left, "wrong": bad, "running_after": stats.num_running,
                "running_bytes_after": stats.running_bytes, "median": med,
            }) + "\n")  # fmt: skip
    if mismatches or bad or stats.num_running or stats.running_bytes:
        sys.exit(1)


if __name__ == "__main__":
    main()
