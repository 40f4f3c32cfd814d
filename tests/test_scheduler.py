"""Scheduler policy on the host (no step runs): the token budget, decodes first,
chunked prefill, FCFS admission, preemption of the newest running request."""

from __future__ import annotations

import functools

import pytest
from flax import nnx

from jenga_jax.core.errors import RequestError
from jenga_jax.engine.engine_request import Status
from jenga_jax.engine.llm_engine import Engine
from jenga_jax.engine.sampling import SamplingParams
from jenga_jax.engine.scheduler import SchedulerConfig
from models import HybridDecoder, tiny_config

CFG = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=48, max_prefill_rows=2)


@functools.cache
def model():
    return HybridDecoder(tiny_config("llama"), rngs=nnx.Rngs(0))


def make(num_large_pages: int = 64) -> Engine:
    return Engine(model(), num_large_pages=num_large_pages, scheduler=CFG, max_model_len=256)


def add(eng: Engine, rid: str, n: int, max_tokens: int = 8) -> None:
    """A request whose prompt shares no page with another's (its first id differs)."""
    first = 1 + len(eng._requests) + eng.counters.finished_requests
    prompt = [first] + [(first * 7 + i) % 256 for i in range(n - 1)]
    eng.add_request(prompt, SamplingParams(max_tokens=max_tokens), request_id=rid)


def rows(step) -> list[tuple[str, int, int]]:
    return [(r.request_id, r.start, r.num_tokens) for r in (*step.decode, *step.prefill)]


def sampled(eng: Engine, rid: str, token: int = 7) -> None:
    """Pretend the step ran and sampled `token` for a request at the end of its tokens."""
    req = eng._requests[rid]
    req.output_token_ids.append(token)
    req.pending.append(token)


def test_chunked_prefill_within_the_token_budget():
    eng = make()
    add(eng, "a", 100)
    add(eng, "b", 30)
    add(eng, "c", 30)
    assert rows(eng.scheduler.schedule()) == [("a", 0, 48)]
    assert rows(eng.scheduler.schedule()) == [("a", 48, 48)]
    # a's last 4 tokens, then b (FCFS); c waits: at most 2 prefill rows per step.
    assert rows(eng.scheduler.schedule()) == [("a", 96, 4), ("b", 0, 30)]
    assert [r.request_id for r in eng.scheduler.waiting] == ["c"]


def test_decodes_come_first():
    eng = make()
    add(eng, "a", 20)
    eng.scheduler.schedule()
    add(eng, "b", 100)
    sampled(eng, "a")
    step = eng.scheduler.schedule()
    assert rows(step) == [("a", 20, 1), ("b", 0, 47)]  # the decode, then the budget left


def test_fcfs_admission_stops_at_the_first_request_that_does_not_fit():
    eng = make(num_large_pages=12)
    add(eng, "a", 170, max_tokens=10)  # 16-token pages, 12 of them (one kind): a takes 11
    for _ in range(4):
        eng.scheduler.schedule()
    add(eng, "big", 40)  # its first chunk needs 3 pages: 1 is free
    add(eng, "small", 4)  # 1 page: would fit, but waits behind big
    sampled(eng, "a")
    assert rows(eng.scheduler.schedule()) == [("a", 170, 1)]
    assert [r.request_id for r in eng.scheduler.waiting] == ["big", "small"]


def test_the_newest_running_request_is_preempted_and_recomputed():
    eng = make(num_large_pages=10)
    for rid in ("a", "b", "c"):
        add(eng, rid, 40, max_tokens=100)
    for _ in range(3):
        eng.scheduler.schedule()
    assert [r.request_id for r in eng.scheduler.running] == ["a", "b", "c"]
    preempted = []
    for _ in range(200):  # decode until the pool runs out
        for rid in [r.request_id for r in eng.scheduler.running]:
            if eng.manager.num_computed_tokens(rid) == eng.manager.num_tokens(rid):
                sampled(eng, rid)
        step = eng.scheduler.schedule()
        if step.preempted:
            preempted = list(step.preempted)
            break
    assert preempted == ["c"]
    c = eng._requests["c"]
    assert c.status is Status.WAITING and c.num_preemptions == 1
    assert not eng.manager.is_running("c")
    assert eng.manager.num_tokens("c") > 40  # its sampled tokens are kept for recompute
    assert [r.request_id for r in eng.scheduler.running] == ["a", "b"]


def test_scheduler_config_is_validated():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_prefill_chunk"):
        SchedulerConfig(max_prefill_chunk=-4)


def test_append_tokens_is_for_waiting_requests_only():
    eng = make()
    add(eng, "a", 20)
    eng.manager.append_tokens("a", [3, 4])  # waiting: fine
    assert eng.manager.num_tokens("a") == 22
    eng.scheduler.schedule()
    with pytest.raises(RequestError, match="running"):
        eng.manager.append_tokens("a", [5])
    eng.manager.preempt("a")
    with pytest.raises(RequestError, match="ints >= 0"):
        eng.manager.append_tokens("a", [-1])


def test_an_older_request_short_of_pages_preempts_the_newest():
    eng = make(num_large_pages=12)  # 16-token pages, one kind
    add(eng, "a", 48)  # 3 full pages: its next token needs a 4th
    for rid in ("b", "c", "d"):
        add(eng, rid, 40)  # 3 pages each, room up to 48 tokens: the pool is full
    while eng.scheduler.schedule().prefill or eng.scheduler.waiting:  # prefill everyone
        pass
    for rid in "abcd":
        sampled(eng, rid)
    step = eng.scheduler.schedule()
    assert step.preempted == ("d",)  # not b or c, which are older
    assert [r.request_id for r in step.decode] == ["a", "b", "c"]
