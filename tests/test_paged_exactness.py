"""Paged generation equals a dense no-cache forward pass, for every tiny family.

One scenario per family (tests/paged_scenario.py): random page placement in a
NaN-poisoned pool, chunked prefill of varied sizes, a second request that hits the
prefix cache, windows that release pages another request then reuses, mixed batches,
preemption and recompute in a tight pool, 64 greedy decode steps.
"""

from __future__ import annotations

import numpy as np
import pytest

from jenga_jax.core.layer_kinds import AttentionType
from models import FAMILIES
from paged_scenario import WINDOWED, dense_logits, run_scenario

RTOL = 1e-5  # float32: max |paged - dense| / max |dense|, per step


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def outcome(request):
    family = request.param
    out = run_scenario(family, slack=2, decode_steps=64)
    dense = {rid: dense_logits(family, t) for rid, t in out.traces.items() if t.logits}
    return family, out, dense


def test_logits_match_dense_at_every_step(outcome):
    family, out, dense = outcome
    assert set(dense) == {"A", "B", "C"}, f"{family}: every request must have run"
    for rid, t in out.traces.items():
        d = dense[rid]
        assert set(t.logits) >= set(range(t.hits[0], len(t.tokens)))  # all after the hit
        for pos, got in t.logits.items():
            assert np.all(np.isfinite(got)), f"{family} {rid} position {pos}: NaN from the pool"
            err = np.abs(got - d[pos]).max() / np.abs(d[pos]).max()
            assert err <= RTOL, f"{family} {rid} position {pos}: relative error {err:.2e}"


def test_greedy_tokens_identical_for_64_steps(outcome):
    family, out, dense = outcome
    a = out.traces["A"]
    generated = a.tokens[a.prompt_len :]
    assert len(generated) == 64
    want = [int(np.argmax(dense["A"][a.prompt_len - 1 + i])) for i in range(64)]
    assert generated == want, family
    for rid in ("B", "C"):
        t = out.traces[rid]
        want = [int(np.argmax(dense[rid][p])) for p in range(t.prompt_len - 1, len(t.tokens) - 1)]
        assert t.tokens[t.prompt_len :] == want, (family, rid)


def test_prefix_hit_reuses_pages(outcome):
    family, out, _ = outcome
    a, b = out.traces["A"], out.traces["B"]
    hit = b.hits[0]
    assert hit > 0, f"{family}: B must start after a prefix-cache hit on A's prompt"
    for k, view in enumerate(out.runner.layout.kinds):
        if view.type is AttentionType.FULL:  # the hit's pages are A's pages
            n = hit // view.tokens_per_page
            assert b.first_pages[k][:n] == b.a_pages[k][:n], family
        if view.type is AttentionType.CROSS:  # the same images: the same pages
            assert b.first_pages[k] == a.first_pages[k]
            assert not set(out.traces["C"].first_pages[k]) & set(a.first_pages[k])


def test_window_pages_released_and_reused(outcome):
    family, out, _ = outcome
    windowed = any(v.type in WINDOWED for v in out.runner.layout.kinds)
    if not windowed:
        assert not out.released_by_a
        return
    assert out.released_by_a, f"{family}: A's windows must release pages"
    assert out.reused, f"{family}: another request must reuse a page A released"


def test_pages_are_scattered(outcome):
    """Random placement: A's pages (when B arrived) are not one ascending run."""
    family, out, _ = outcome
    tables = out.traces["B"].a_pages.values()
    pages = max(([p for p in t if p is not None] for t in tables), key=len)
    assert len(pages) >= 4 and pages != list(range(pages[0], pages[0] + len(pages))), family
