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
from jenga_jax.engine.model_runner import ModelRunner, Work
from models import FAMILIES
from paged_scenario import WINDOWED, dense_logits, random_model, run_scenario

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


@pytest.mark.parametrize(
    "family,backend,steps",
    [
        ("gpt-oss", "triton-interpret", 16),  # sinks, a 128-token window
        ("llama-vision", "triton-interpret", 16),  # cross attention, page_fill
    ],
)
def test_kernels_in_the_model_match_dense(family, backend, steps):
    """The same scenario with the Pallas kernels (interpret mode) inside the model."""
    out = run_scenario(family, slack=2, decode_steps=steps, backend=backend)
    for rid, t in out.traces.items():
        d = dense_logits(family, t)
        for pos, got in t.logits.items():
            err = np.abs(got - d[pos]).max() / np.abs(d[pos]).max()
            assert err <= RTOL, f"{family} {backend} {rid} position {pos}: {err:.2e}"
        want = [int(np.argmax(d[p])) for p in range(t.prompt_len - 1, len(t.tokens) - 1)]
        assert t.tokens[t.prompt_len :] == want


def test_mosaic_kernel_in_the_model_matches_dense():
    """TPU interpret mode is slow: a short run (two requests, a prefix hit, chunked
    prefill, a mixed batch, 4 decode steps) of a sliding + soft-capped model."""
    family = "gemma2"
    runner = ModelRunner(
        random_model(family), num_large_pages=64, attention_backend="mosaic-interpret",
        shuffle_seed=3, pool_fill=float("nan"),
    )  # fmt: skip
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, 41).tolist()
    seqs = {"a": a, "b": a[:32] + rng.integers(0, 256, 6).tolist()}
    for rid, toks in seqs.items():
        runner.add_request(rid, toks, max_new_tokens=4)
    got = {"a": {}, "b": {}}

    def run(work, decode=False):
        rows, logits, refused = runner.step(work, decode=decode, all_logits=not decode)
        assert not refused
        for row, lg in zip(rows, logits):
            for j in range(row.num_tokens):
                got[row.request_id][row.start + j] = lg[j] if not decode else lg
        return rows

    run([Work("a", 25)])
    rows = run([Work("a", 16), Work("b", 38)])  # b starts after its hit on a's pages
    assert rows[1].start > 0
    for _ in range(4):
        work = []
        for rid, toks in seqs.items():
            toks.append(int(np.argmax(got[rid][len(toks) - 1])))
            work.append(Work(rid, 1, (toks[-1],)))
        run(work, decode=True)
    for rid, toks in seqs.items():
        model = random_model(family)
        dense = np.asarray(model.forward_dense(np.asarray([toks])))[0]
        for pos, lg in got[rid].items():
            err = np.abs(lg - dense[pos]).max() / np.abs(dense[pos]).max()
            assert err <= RTOL, f"{rid} position {pos}: {err:.2e}"
