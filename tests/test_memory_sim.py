"""The memory simulator behind benchmarks/memory.py, on small budgets."""

from __future__ import annotations

from jenga_jax.core import ModelLayout, get_layout
from jenga_jax.core import layer_kinds as lk
from jenga_jax.core.invariants import check_manager
from jenga_jax.core.memory_sim import simulate
from jenga_jax.core.workloads import arxiv_qa_like, mmmu_like


def test_vision_paged_wastes_most_memory_and_jenga_runs_several_times_more():
    layout = get_layout("llama-3.2-11b-vision")
    trace = mmmu_like(60, seed=1)
    budget = 6 << 30
    jenga = simulate(layout, trace, allocator="jenga", kv_budget_bytes=budget)
    paged = simulate(layout, trace, allocator="paged", kv_budget_bytes=budget)
    assert jenga.finished == paged.finished == 60
    assert paged.memory_bound_steps and jenga.memory_bound_steps
    assert 0.70 < paged.memory_bound_mean_waste < 0.85
    assert jenga.memory_bound_mean_waste < 0.03
    assert jenga.mean_running_requests > 3 * paged.mean_running_requests


def test_state_models_hit_the_prefix_cache_and_stay_consistent():
    layout = ModelLayout(
        "tiny-jamba", (lk.state(4096, checkpoint_interval=64),) * 3 + (lk.full(2, 16),)
    )
    trace = arxiv_qa_like(30, seed=2, doc_tokens_mean=400, doc_tokens_std=50)
    res = simulate(layout, trace, allocator="jenga", kv_budget_bytes=300_000, check=check_manager)
    assert res.finished == 30
    assert res.cache_hit_rate > 0.3  # documents shared through saved states
    assert res.preemptions > 0 and res.memory_bound_mean_waste < 0.1
