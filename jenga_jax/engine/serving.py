"""Replay a seeded trace through an engine and measure it.

Used by ``examples/serve.py``, ``benchmarks/serving.py`` and the serving notebook.
Requests join when the wall clock passes their arrival time (all at once when the
trace has none); the loop steps the engine until every request has finished.

Timing: ``duration_s`` is the loop's wall time minus the time spent sampling memory
statistics after each step (host bookkeeping for this report, not serving work).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from jenga_jax.core.request import TraceRequest
from jenga_jax.engine.compile_counter import CompileCounter
from jenga_jax.engine.llm_engine import Engine
from jenga_jax.engine.model_runner import Image
from jenga_jax.engine.sampling import SamplingParams


def image_embeds(content_hash: str, num_tokens: int, vision_dim: int, dtype="float32"):
    """Stand-in vision-encoder output [num_tokens, vision_dim]: a function of the hash."""
    seed = int.from_bytes(hashlib.blake2b(content_hash.encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.0, (num_tokens, vision_dim)).astype(dtype)


@dataclasses.dataclass(frozen=True)
class ServingReport:
    model: str
    workload: str
    allocator: str
    num_requests: int
    duration_s: float
    requests_per_s: float
    tokens_per_s: float  # generated tokens per second
    mean_batch_size: float  # requests per step
    steps: int
    preemptions: int
    compilations: int  # XLA compilations during the run (0 after warmup)
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    tpot_p99_s: float
    mean_waste: float  # mean over steps of 1 - needed / held KV bytes
    prefix_hit_rate: float  # prompt tokens found in the prefix cache / prompt tokens
    generated_tokens: int
    kv_budget_bytes: int

    def row(self) -> dict:
        return dataclasses.asdict(self)


def engine_requests(engine: Engine, trace: Sequence[TraceRequest], *, temperature: float = 0.0):
    """(arrival, prompt, params, images, request_id) for each trace request; images become
    stand-in embeddings (the trace has only their sizes and hashes)."""
    cfg = engine.cfg
    out = []
    for i, r in enumerate(trace):
        images = [
            Image(im.content_hash, image_embeds(im.content_hash, im.num_tokens, cfg.vision_dim))
            for im in r.images
        ] if cfg.vision_dim else []  # fmt: skip
        params = SamplingParams(temperature=temperature, seed=i, max_tokens=r.output_len)
        out.append((r.arrival, list(r.prompt_token_ids), params, images, r.request_id))
    return out


def _percentile(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def run_trace(
    engine: Engine,
    trace: Sequence[TraceRequest],
    *,
    workload: str = "trace",
    temperature: float = 0.0,
    progress: bool = False,
    on_output=None,
) -> ServingReport:
    """Serve `trace` to completion on `engine` (warmed up or not) and measure it.

    on_output(request_id, output_token_ids) is called as each request finishes."""
    pending = sorted(engine_requests(engine, trace, temperature=temperature), key=lambda r: r[0])
    done = []  # finished outputs (they carry their request's times)
    wastes = []
    stats_s = 0.0
    hits0, queried0 = engine.manager.hit_tokens, engine.manager.queried_tokens
    steps0, rows0 = engine.counters.steps, engine.counters.rows
    gen0, pre0 = engine.counters.generated_tokens, engine.scheduler.num_preemptions
    start = time.perf_counter()
    i, shown = 0, -1
    with CompileCounter() as compiles:
        while i < len(pending) or engine.has_unfinished():
            now = time.perf_counter() - start - stats_s
            while i < len(pending) and pending[i][0] <= now:
                _, prompt, params, images, rid = pending[i]
                engine.add_request(prompt, params, images, request_id=rid)
                i += 1
            if not engine.has_unfinished():  # idle until the next arrival
                time.sleep(max(0.0, pending[i][0] - now))
                continue
            outputs = engine.step()
            t = time.perf_counter()
            for o in outputs:
                if o.finished:
                    done.append(o)
                    if on_output is not None:
                        on_output(o.request_id, o.output_token_ids)
            stats = engine.manager.stats()
            if stats.held_bytes:
                wastes.append(stats.waste)
            stats_s += time.perf_counter() - t
            if progress and len(done) != shown:  # redraw when a request finishes
                shown = len(done)
                _progress(shown, len(pending))
    if progress:
        sys.stderr.write("\n")
    duration = time.perf_counter() - start - stats_s
    ttft = [o.first_token_time - o.arrival_time for o in done]
    tpot = [
        (o.finish_time - o.first_token_time) / (len(o.output_token_ids) - 1)
        for o in done
        if len(o.output_token_ids) > 1
    ]
    c = engine.counters
    steps = c.steps - steps0
    generated = c.generated_tokens - gen0
    queried = engine.manager.queried_tokens - queried0
    return ServingReport(
        model=engine.cfg.name,
        workload=workload,
        allocator=engine.runner.plan.allocator,
        num_requests=len(pending),
        duration_s=duration,
        requests_per_s=len(done) / duration,
        tokens_per_s=generated / duration,
        mean_batch_size=(c.rows - rows0) / steps if steps else 0.0,
        steps=steps,
        preemptions=engine.scheduler.num_preemptions - pre0,
        compilations=sum(compiles.counts.values()),
        ttft_p50_s=_percentile(ttft, 50),
        ttft_p90_s=_percentile(ttft, 90),
        ttft_p99_s=_percentile(ttft, 99),
        tpot_p50_s=_percentile(tpot, 50),
        tpot_p90_s=_percentile(tpot, 90),
        tpot_p99_s=_percentile(tpot, 99),
        mean_waste=float(np.mean(wastes)) if wastes else 0.0,
        prefix_hit_rate=(engine.manager.hit_tokens - hits0) / queried if queried else 0.0,
        generated_tokens=generated,
        kv_budget_bytes=engine.manager.stats().pool_bytes,
    )


def _progress(done: int, total: int, width: int = 30) -> None:
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} requests")
    sys.stderr.flush()


def format_table(reports: Sequence[ServingReport]) -> str:
    """Side-by-side table of reports (one column per allocator)."""
    rows = [
        ("requests/s", "requests_per_s", "{:.2f}"),
        ("tokens/s", "tokens_per_s", "{:.1f}"),
        ("mean batch size", "mean_batch_size", "{:.2f}"),
        ("steps", "steps", "{}"),
        ("preemptions", "preemptions", "{}"),
        ("TTFT p50 / p90 / p99 (ms)", ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s"), "ms"),
        ("TPOT p50 / p90 / p99 (ms)", ("tpot_p50_s", "tpot_p90_s", "tpot_p99_s"), "ms"),
        ("mean KV waste", "mean_waste", "{:.1%}"),
        ("prefix-cache hit rate", "prefix_hit_rate", "{:.1%}"),
        ("compilations", "compilations", "{}"),
    ]
    header = ["", *(r.allocator for r in reports)]
    lines = [header]
    for label, field, fmt in rows:
        cells = [label]
        for r in reports:
            if fmt == "ms":
                cells.append(" / ".join(f"{getattr(r, f) * 1e3:.0f}" for f in field))
            else:
                cells.append(fmt.format(getattr(r, field)))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))
        )
        for line in lines
    )
