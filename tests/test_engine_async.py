"""Asynchronous scheduling (``Engine(async_scheduling=True)``): step N+1 is scheduled
and dispatched before step N's tokens reach the host, its decode rows taking them on
the device. Tokens, finish reasons and page accounting must equal the synchronous
engine's: greedy and seeded sampling, preemption under a tight pool, stop tokens,
max_tokens and aborts. Also the manager's tokens of unknown id (``num_unknown``)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from flax import nnx

from jenga_jax.core import KVCacheManager, ModelLayout, make_plan
from jenga_jax.core import layer_kinds as lk
from jenga_jax.core.errors import RequestError
from jenga_jax.core.invariants import check_manager
from jenga_jax.engine.llm_engine import Engine
from jenga_jax.engine.sampling import SamplingParams
from jenga_jax.engine.scheduler import SchedulerConfig
from models import HybridDecoder, tiny_config
from models.random_init import perturb

SCHED = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=40, max_prefill_rows=2)
MAX_LEN = 128


@functools.cache
def model(family: str):
    return perturb(HybridDecoder(tiny_config(family), rngs=nnx.Rngs(0)), seed=3)


def make_engine(family: str, num_large_pages: int, async_scheduling: bool) -> Engine:
    return Engine(
        model(family),
        num_large_pages=num_large_pages,
        scheduler=SCHED,
        max_model_len=MAX_LEN,
        checkpoint_interval=32 if family == "jamba" else None,
        seed=11,
        async_scheduling=async_scheduling,
        compilation_cache_dir="off",
    )


def workload(family: str, n: int = 14, seed: int = 0):
    """Greedy, seeded and unseeded sampled requests sharing a prefix, some repeated."""
    rng = np.random.default_rng(seed)
    vocab = tiny_config(family).vocab_size
    system = rng.integers(0, vocab, 24).tolist()
    hot = 12.0 if family == "gemma3" else 0.9  # gemma3's logits are sharp
    out = []
    for i in range(n):
        if i >= 3 and rng.random() < 0.3:
            prompt = out[int(rng.integers(len(out)))][0]
        else:
            prompt = system + rng.integers(0, vocab, int(rng.integers(1, 40))).tolist()
        kind = i % 3
        params = SamplingParams(
            temperature=0.0 if kind == 0 else hot,
            top_k=[0, 20, 0][kind],
            seed=None if kind == 2 else i,
            max_tokens=int(rng.integers(1, 40)),
        )
        out.append((prompt, params))
    return out


def serve(eng: Engine, requests, *, abort_after: dict[str, int] | None = None):
    """Add the requests in two waves (2/3, then the rest 4 steps later); abort request
    r once it has abort_after[r] tokens. -> {id: final output}, checking every output
    given out (in order, none after a request finished)."""
    abort_after = abort_after or {}
    ids = [f"r{i}" for i in range(len(requests))]
    given: dict[str, list[int]] = {rid: [] for rid in ids}
    done = {}

    def step():
        for o in eng.step():
            assert o.request_id not in done, f"{o.request_id} got a token after it finished"
            given[o.request_id] += o.new_token_ids
            assert list(o.output_token_ids) == given[o.request_id]
            if o.finished:
                done[o.request_id] = o
            elif len(o.output_token_ids) == abort_after.get(o.request_id):
                done[o.request_id] = eng.abort(o.request_id)

    half = 2 * len(requests) // 3
    for rid, (prompt, params) in zip(ids[:half], requests[:half]):
        eng.add_request(prompt, params, request_id=rid)
    for _ in range(4):
        step()
    for rid, (prompt, params) in zip(ids[half:], requests[half:]):
        eng.add_request(prompt, params, request_id=rid)
    while eng.has_unfinished():
        step()
    return {rid: done[rid] for rid in ids}


def assert_no_leak(eng: Engine) -> None:
    check_manager(eng.manager)
    stats = eng.manager.stats()
    assert stats.num_running == 0 and stats.running_bytes == 0
    eng.manager.reset_cache()
    stats = eng.manager.stats()
    assert stats.held_bytes == 0 and stats.empty_bytes == stats.pool_bytes


def tight_pool(family: str) -> int:
    """The fewest large pages that accept every request: many preemptions."""
    cfg = tiny_config(family)
    plan = make_plan(cfg.layout(cfg.dtype, 32 if family == "jamba" else None), "jenga", 16)
    for n in range(1, 1000):
        manager = KVCacheManager(plan.layout, n * plan.large_page_bytes, plan=plan)
        try:
            for i, (prompt, params) in enumerate(workload(family)):
                manager.add_request(
                    str(i), prompt, max_new_tokens=params.max_tokens,
                    prefill_chunk=SCHED.prefill_chunk,
                )  # fmt: skip
        except RequestError:
            continue
        return n
    raise AssertionError("no pool fits")


@pytest.mark.parametrize("family", ["gemma3", "jamba"])
def test_async_tokens_equal_sync_under_preemption_stops_and_aborts(family):
    requests = workload(family)
    small = tight_pool(family)
    roomy = serve(make_engine(family, 40 * small, False), requests)
    # Stop tokens: a token each greedy or seeded request emits mid-way, so it ends early.
    stops = []
    for i, (prompt, params) in enumerate(requests):
        out = roomy[f"r{i}"].output_token_ids
        stop = (out[len(out) // 2],) if params.seed is not None and len(out) > 2 else ()
        stops.append((prompt, SamplingParams(**{**vars(params), "stop_token_ids": stop})))
    aborts = {"r1": 3, "r4": 1, "r9": 2}
    runs = {}
    for mode in (False, True):
        eng = make_engine(family, small, mode)
        runs[mode] = serve(eng, stops, abort_after=aborts)
        assert eng.scheduler.num_preemptions >= 1, mode  # the pool is tight
        assert_no_leak(eng)
    sync, asyn = runs[False], runs[True]
    for rid in sync:
        a, b = sync[rid], asyn[rid]
        assert a.output_token_ids == b.output_token_ids, rid
        assert a.finish_reason == b.finish_reason, rid
    for i, (_, params) in enumerate(stops):
        out, full = asyn[f"r{i}"], roomy[f"r{i}"].output_token_ids
        if out.finish_reason == "abort":
            assert len(out.output_token_ids) == aborts[f"r{i}"]
        elif params.stop_token_ids:
            cut = list(full).index(params.stop_token_ids[0]) + 1
            assert out.output_token_ids == full[:cut] and out.finish_reason == "stop"
        else:  # never preempted, or preempted: the same tokens
            assert out.output_token_ids == full and out.finish_reason == "length"
    assert sum(o.finish_reason == "stop" for o in asyn.values()) >= 2


def test_async_step_dispatches_before_it_fetches_the_previous_step():
    eng = make_engine("gemma3", 64, True)
    runner = eng.runner
    calls = []
    dispatch, fetch = runner.dispatch, runner.fetch_tokens

    def watched_dispatch(step, offset=0):
        tokens, logprobs = dispatch(step, offset)
        calls.append(("dispatch", id(tokens)))
        return tokens, logprobs

    def watched_fetch(pending, counts):
        calls.append(("fetch", tuple(id(p) for p in pending)))
        return fetch(pending, counts)

    runner.dispatch, runner.fetch_tokens = watched_dispatch, watched_fetch
    rid = eng.add_request(list(range(10)), SamplingParams(temperature=0.0, max_tokens=4))
    assert eng.step() == []  # the prefill is on the device; nothing fetched yet
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert [len(o.output_token_ids) for o in outs] == [1, 2, 3, 4] and outs[-1].finished
    assert rid not in eng.manager  # freed when its last token arrived
    assert eng.step() == []  # fetches the step dispatched with its last token in flight
    dispatched = [c[1] for c in calls if c[0] == "dispatch"]
    fetched = [c[1] for c in calls if c[0] == "fetch"]
    assert len(dispatched) == 5  # the prefill, 3 decodes, and one whose token is dropped
    assert [f[0] for f in fetched] == dispatched  # each step fetched once, in order
    first_fetch = calls.index(("fetch", fetched[0]))
    assert calls[first_fetch - 1] == ("dispatch", dispatched[1])  # step 2 went first
    assert eng.counters.generated_tokens == 4
    assert_no_leak(eng)


def _manager(tpp=4):
    layout = ModelLayout("t", (lk.full(1, 4, "float32"),))
    plan = make_plan(layout, "jenga", tpp, fixed_tokens_per_page=True)
    return KVCacheManager(layout, plan.large_page_bytes * 32, plan=plan)


def test_manager_allocates_tokens_of_unknown_id_and_caches_them_once_given():
    m = _manager()
    m.add_request("a", [1, 2, 3, 4, 5, 6, 7])
    with pytest.raises(RequestError, match="waiting"):
        m.allocate("a", 7, num_unknown=1)
    assert m.allocate("a", 7)  # the prompt; its last token samples token 8
    assert m.allocate("a", 1, num_unknown=1)  # token 8 (position 7) still on the device
    assert m.num_unknown_tokens("a") == 1
    assert m.num_tokens("a") == 7 and m.num_computed_tokens("a") == 8
    with pytest.raises(RequestError, match="being sampled"):
        m.allocate("a", 1, [9])  # its id first
    with pytest.raises(RequestError, match="unknown id"):
        m.append_tokens("a", [8, 9])
    m.add_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    m.add_request("c", [1, 2, 3, 4, 5, 6, 99, 8, 9])
    assert m.lookup("b") == 4  # page [4, 8) waits for the id of token 8
    m.append_tokens("a", [8])  # page [4, 8) is full and known: cached now
    assert m.num_unknown_tokens("a") == 0 and m.num_tokens("a") == 8
    assert m.lookup("b") == 8 and m.lookup("c") == 4
    check_manager(m)
    assert m.allocate("a", 1, num_unknown=1)
    m.free("a")  # its unknown token is forgotten with it
    check_manager(m)
    assert m.lookup("b") == 8
