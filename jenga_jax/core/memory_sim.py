"""A memory-only serving simulation: how many requests fit, and how much is wasted.

FCFS admission under a fixed KV budget (a whole prompt per admission), one decode
token per running request per step, free on finish, preempt the newest running
request when an allocation fails (it waits again at the front of the queue and is
recomputed, with whatever the prefix cache still holds). No model runs: generated
token ids come from a seeded generator.

Every request arrives at step 0, so "how many requests run at once" is measured over
the saturated steps (a request still waits for memory); the drain at the end, when
the queue is empty, is reported apart.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from collections.abc import Sequence

from jenga_jax.core.errors import RequestTooLargeError
from jenga_jax.core.kv_cache_manager import KVCacheManager
from jenga_jax.core.layout import ModelLayout
from jenga_jax.core.page_plan import make_plan
from jenga_jax.core.request import TraceRequest


@dataclasses.dataclass
class SimResult:
    model: str
    workload: str
    allocator: str
    kv_budget_bytes: int
    large_page_bytes: int
    steps: int = 0
    peak_running_requests: int = 0
    mean_running_requests: float = 0.0  # over saturated steps: some request still waits
    mean_running_all_steps: float = 0.0  # over every step, the final drain included
    saturated_steps: int = 0
    memory_bound_steps: int = 0
    memory_bound_mean_waste: float = 0.0
    memory_bound_peak_waste: float = 0.0
    cache_hit_rate: float = 0.0
    preemptions: int = 0
    rejected: int = 0
    finished: int = 0
    # Per memory-bound step: (step, held bytes, needed bytes), for plots.
    trace: list[tuple[int, int, int]] = dataclasses.field(default_factory=list, repr=False)

    def row(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("trace")
        return out


def simulate(
    layout: ModelLayout,
    requests: Sequence[TraceRequest],
    *,
    allocator: str = "jenga",
    kv_budget_bytes: int = 40 << 30,
    tokens_per_page: int = 16,
    workload: str = "trace",
    seed: int = 0,
    max_steps: int = 1_000_000,
    check=None,
    plan_options: dict | None = None,
) -> SimResult:
    """Run the trace to completion; `check(manager)` (if given) runs after every step.
    `plan_options`: more arguments of ``make_plan`` (e.g. ``tpu_alignment(2)``)."""
    plan = None
    if plan_options:
        plan = make_plan(layout, allocator, tokens_per_page, **plan_options)
    manager = KVCacheManager(
        layout, kv_budget_bytes, allocator=allocator, tokens_per_page=tokens_per_page, plan=plan
    )
    res = SimResult(
        layout.name, workload, allocator, kv_budget_bytes, manager.plan.large_page_bytes
    )
    rng = random.Random(seed)
    waiting: collections.deque[str] = collections.deque()
    output_len: dict[str, int] = {}
    generated: dict[str, int] = {}
    for req in requests:
        try:
            manager.add_request(
                req.request_id,
                req.prompt_token_ids,
                images=req.images,
                salt=req.salt,
                adapter=req.adapter,
                max_new_tokens=req.output_len,
            )
        except RequestTooLargeError:
            res.rejected += 1
            continue
        waiting.append(req.request_id)
        output_len[req.request_id] = req.output_len
        generated[req.request_id] = 0
    running: list[str] = []  # admission order: the newest is last
    hit_tokens = prompt_tokens = 0
    seen: set[str] = set()
    running_sum = saturated_sum = waste_sum = 0.0
    while (waiting or running) and res.steps < max_steps:
        bound = False
        # Decode: one token per running request, oldest first.
        i = 0
        while i < len(running):
            rid = running[i]
            token = rng.randrange(1 << 15)
            while not manager.allocate(rid, 1, [token]):
                bound = True
                victim = running.pop()
                manager.preempt(victim)
                waiting.appendleft(victim)
                res.preemptions += 1
                if victim == rid:
                    break
            else:
                generated[rid] += 1
                i += 1
        # Admit waiting requests FCFS while their whole prompt fits.
        while waiting:
            rid = waiting[0]
            result = _prefill(manager, rid)
            if not result:
                if not running:  # add_request vouched that it fits an empty pool
                    raise RuntimeError(f"{rid} cannot be admitted into an idle pool: {result}")
                bound = True
                break
            waiting.popleft()
            running.append(rid)
            generated[rid] += 1  # the prefill's logits give the next token
            if rid not in seen:
                seen.add(rid)
                hit_tokens += result.num_cached_tokens
                prompt_tokens += manager.num_tokens(rid)
        res.steps += 1
        res.peak_running_requests = max(res.peak_running_requests, len(running))
        running_sum += len(running)
        if waiting:
            res.saturated_steps += 1
            saturated_sum += len(running)
        if bound:
            stats = manager.stats()
            res.memory_bound_steps += 1
            waste_sum += stats.waste
            res.memory_bound_peak_waste = max(res.memory_bound_peak_waste, stats.waste)
            res.trace.append((res.steps, stats.held_bytes, stats.needed_bytes))
        if check is not None:
            check(manager)
        # Finish.
        done = [rid for rid in running if generated[rid] >= output_len[rid]]
        for rid in done:
            running.remove(rid)
            manager.free(rid)
            res.finished += 1
    res.mean_running_all_steps = running_sum / max(res.steps, 1)
    res.mean_running_requests = saturated_sum / max(res.saturated_steps, 1)
    res.memory_bound_mean_waste = waste_sum / max(res.memory_bound_steps, 1)
    res.cache_hit_rate = hit_tokens / max(prompt_tokens, 1)
    return res


def _prefill(manager: KVCacheManager, rid: str):
    """Allocate the whole prompt; with state kinds, in chunks ending on checkpoints.

    Returns the first allocation's result (with its cache hit), or a refusal, in which
    case the request is back to waiting (a partly prefilled one is preempted: what it
    computed stays in the cache).
    """
    hit = manager.lookup(rid)
    total = manager.num_tokens(rid)
    interval = manager.checkpoint_interval
    ends = list(range((hit // interval + 1) * interval, total, interval)) if interval else []
    first = None
    done = hit
    for end in [*ends, total]:
        result = manager.allocate(rid, end - done)
        if not result:
            if manager.is_running(rid):
                manager.preempt(rid)
            return result
        first = first or result
        done = end
    return first
