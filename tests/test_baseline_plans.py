"""The baseline page plans ("paged", "uniform") on the device equal a dense forward.

The scenario of tests/paged_scenario.py under each baseline's plan (random placement in
a NaN-filled pool, chunked prefill, a prefix-cache hit, mixed batches, preemption and
recompute, greedy decode), then checks that the pages really are laid out as the plan
says: images inline in the paged token stream, padded state pages, windows masked but
never released (paged) or released (uniform).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jenga_jax.core import ImageInput, KVCacheManager, ModelLayout, make_plan
from jenga_jax.core import layer_kinds as lk
from jenga_jax.core.layer_kinds import AttentionType
from jenga_jax.device.mamba import read_state, state_view, write_state
from jenga_jax.device.pool import PoolLayout
from jenga_jax.device.reference_attention import dense_attention, kind_view, paged_attention
from jenga_jax.engine.buckets import Buckets
from jenga_jax.engine.model_runner import Image, ModelRunner, Work
from jenga_jax.engine.page_table_builder import StepRow, build_page_table
from paged_scenario import WINDOWED, Trace, dense_logits, random_model, run_scenario

MIB = 2**20

RTOL = 1e-5
# One shape per step kind: few compiles (rows <= 3, chunks <= 68, <= 16 pages).
FIXED = Buckets(batch=(4,), queries=(128,), pages=(16,), encoder=(32,))
# (family, allocator): what each case adds. All run in the smallest pool for A.
CASES = {
    ("llama-vision", "paged"): "images inline, a hit over images and text, preemption",
    ("jamba", "paged"): "one padded state page of every Mamba layer, preemption",
    ("jamba", "uniform"): "padded state pages, 32-token pages, a hit at a checkpoint",
    ("gemma3", "paged"): "windows masked, every token kept, a hit, preemption",
    ("gemma3", "uniform"): "windows released and reused, a hit",
    ("llama-vision", "uniform"): "a cross kind among padding-free groups, preemption",
}


@pytest.fixture(scope="module", params=list(CASES), ids=lambda c: "-".join(c))
def outcome(request):
    family, allocator = request.param
    out = run_scenario(family, slack=0, decode_steps=16, allocator=allocator, buckets=FIXED)
    dense = {rid: dense_logits(family, t) for rid, t in out.traces.items() if t.logits}
    return family, allocator, out, dense


def test_logits_and_tokens_match_dense(outcome):
    family, allocator, out, dense = outcome
    assert set(dense) == {"A", "B", "C"}, f"{family} {allocator}: every request must run"
    for rid, t in out.traces.items():
        d = dense[rid]
        assert set(t.logits) >= set(range(t.hits[0], len(t.tokens)))
        for pos, got in t.logits.items():
            assert np.all(np.isfinite(got)), f"{family} {allocator} {rid} {pos}: NaN"
            err = np.abs(got - d[pos]).max() / np.abs(d[pos]).max()
            assert err <= RTOL, f"{family} {allocator} {rid} position {pos}: {err:.2e}"
        want = [int(np.argmax(d[p])) for p in range(t.prompt_len - 1, len(t.tokens) - 1)]
        assert t.tokens[t.prompt_len :] == want and len(want) == t.budget, (family, rid)


def test_hits_and_preemption(outcome):
    family, allocator, out, _ = outcome
    b = out.traces["B"]
    if (family, allocator) == ("jamba", "paged"):
        # The paged plan's one state page is never a checkpoint: no prefix hit.
        assert out.runner.manager.checkpoint_interval is None and b.hits[0] == 0
    else:
        assert b.hits[0] > 0, f"{family} {allocator}: B must hit A's prefix"
    if "preemption" in CASES[family, allocator]:
        assert any(t.preempted for t in out.traces.values()), (family, allocator)
        assert len(b.hits) > 1  # B came back, and recomputed after its hit


def test_pages_as_the_plan_says(outcome):
    family, allocator, out, _ = outcome
    runner = out.runner
    kinds = runner.layout.kinds
    for view, planned in zip(kinds, runner.plan.kinds):
        assert view.tokens_per_page == planned.tokens_per_page
    if allocator == "paged":  # one token kind of every attention layer, all tokens kept
        tokens = [v for v in kinds if not v.is_state]
        layers = [i for i, t in enumerate(runner.cfg.layer_types) if t is not AttentionType.STATE]
        assert len(tokens) == 1 and tokens[0].num_layers == len(layers)
        assert tokens[0].mixed == (family != "jamba")  # sliding or cross beside full
        assert tokens[0].inline_images == (family == "llama-vision")
        assert not out.released_by_a
        a = out.traces["B"].a_pages[0]  # A's stream when B arrived: no page released
        assert None not in a and len(a) * tokens[0].tokens_per_page >= 100
    b = out.traces["B"]
    for k, view in enumerate(kinds if b.hits[0] and b.a_pages else ()):
        # B's hit is pages A holds (paged: the images' too); when A is still running.
        if view.type is AttentionType.FULL:
            hit = b.hits[0] + (29 if view.inline_images else 0)
            n = hit // view.tokens_per_page
            assert n and b.first_pages[k][:n] == b.a_pages[k][:n], (family, allocator, k)
        if view.type is AttentionType.CROSS:  # the same images: the same pages
            assert b.first_pages[k] == b.a_pages[k]
    if family == "jamba":
        assert all(v.padded for v in kinds if v.is_state)
        if allocator == "paged":
            assert [v.layers_per_page for v in kinds if v.is_state] == [3]
        else:
            assert [v.tokens_per_page for v in kinds if not v.is_state] == [32]
    if (family, allocator) == ("gemma3", "uniform"):
        assert any(v.type in WINDOWED for v in kinds)
        assert out.released_by_a and out.reused


# --------------------------------------------------------------------------- pool contents


def _stream(view, table, layer):
    """K and V [tokens, kv_heads, head_dim] of one layer along a block table."""
    pages = np.asarray(view)[table, layer]  # [P, tpp, 2 * kv_heads, head_dim]
    kv_heads = pages.shape[2] // 2
    kv = pages.reshape(-1, 2, kv_heads, pages.shape[3]).transpose(1, 0, 2, 3)
    return kv  # [2, P * tpp, kv_heads, head_dim]


def test_paged_images_sit_inline_in_the_cross_layers_only():
    """Two images, then the text, in every layer's stream: the cross layer holds the
    images' K/V at [0, 29) and nothing at the text; the self layers hold the text's K/V
    and nothing at the images. A request whose hit ends inside the images recomputes
    them into new pages; a request without images skips the cross layer."""
    family = "llama-vision"
    model = random_model(family)
    runner = ModelRunner(
        model, allocator="paged", num_large_pages=40, pool_fill=float("nan"), shuffle_seed=5,
        buckets=FIXED,
    )  # fmt: skip
    rng = np.random.default_rng(5)
    images = [
        Image(h, rng.normal(size=(n, 48)).astype(np.float32)) for h, n in (("p", 20), ("q", 9))
    ]
    prompts = {r: rng.integers(0, 256, 10).tolist() for r in ("a", "b", "n")}
    runner.add_request("a", prompts["a"], images=images)
    rows, logits, _ = runner.step([Work("a", 10)], all_logits=True)
    got = {"a": logits[0]}
    view = runner.layout.view(runner.pool, 0)
    table = runner.manager.block_table("a", 0)
    k, v = _stream(view, table, 3)  # the cross layer
    want_k, want_v = model.blocks[3].mixer.project(
        jnp.concatenate([i.embeds for i in images])[None]
    )
    np.testing.assert_allclose(k[:29], want_k[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v[:29], want_v[0], rtol=1e-5, atol=1e-5)
    assert np.isnan(k[29:]).all() and np.isnan(v[29:]).all()
    for layer in (0, 1, 2, 4):  # self layers: the text at [29, 39), nothing before
        k, v = _stream(view, table, layer)
        assert np.isnan(k[:29]).all() and np.isnan(v[:29]).all()
        assert np.isfinite(k[29:39]).all() and np.isfinite(v[29:39]).all()
    # b: the same images (a 16-token hit inside them, dropped) and other text; n: none.
    runner.add_request("b", prompts["b"], images=images)
    runner.add_request("n", prompts["n"])
    assert runner.manager.lookup("b") == 0
    rows, logits, _ = runner.step([Work("b", 10), Work("n", 10)], all_logits=True)
    assert [r.start for r in rows] == [0, 0]
    b_table = runner.manager.block_table("b", 0)
    assert not set(b_table) & set(table)  # the images recomputed, into new pages
    got |= {"b": logits[0], "n": logits[1]}
    for rid, ims in (("a", images), ("b", images), ("n", [])):
        d = dense_logits(family, Trace(prompts[rid], 10, 0, None, ims))
        err = np.abs(got[rid] - d).max() / np.abs(d).max()
        assert err <= RTOL, (rid, err)


@pytest.mark.parametrize("allocator", ["paged", "uniform"])
def test_padded_state_pages_keep_their_tail_untouched(allocator):
    runner = ModelRunner(
        random_model("jamba"), allocator=allocator, num_large_pages=8, pool_fill=float("nan"),
        buckets=FIXED,
    )  # fmt: skip
    runner.add_request("a", list(range(1, 30)), max_new_tokens=2)
    runner.step([Work("a", 29)])
    for k, view in enumerate(runner.layout.kinds):
        if not view.is_state:
            continue
        d_inner, d_state, d_conv = view.state_dims
        used = view.layers_per_page * ((d_conv - 1) * d_inner + d_inner * d_state)
        page = runner.manager.block_table("a", k)[-1]  # the state just written
        flat = np.asarray(runner.layout.view(runner.pool, k))[page].reshape(-1)  # [page_elems]
        assert used < view.page_elems and np.isfinite(flat[:used]).all()
        assert np.isnan(flat[used:]).all()


@pytest.mark.parametrize("family,allocator", [("llama-vision", "paged"), ("jamba", "uniform")])
def test_baseline_steps_update_the_pool_in_place(family, allocator):
    """Inline image writes and padded state pages keep the pool aliased, as jenga's."""
    runner = ModelRunner(random_model(family), allocator=allocator, kv_budget_bytes=16 * MIB)
    images = []
    if runner.cfg.vision_dim:
        images = [Image("i", np.random.default_rng(0).normal(size=(20, 48)).astype(np.float32))]
    runner.add_request("a", list(range(1, 41)), images=images, max_new_tokens=4)
    for decode, work in ((False, Work("a", 40)), (True, Work("a", 1, (7,)))):
        rows, _ = runner.allocate([work])
        step = runner.prepare(rows, decode=decode)
        mem = step.fn.lower(runner.params, runner.pool, step.table, step.inputs).compile()
        mem = mem.memory_analysis()
        assert mem.alias_size_in_bytes >= runner.layout.nbytes, (decode, mem)
        assert mem.temp_size_in_bytes < 0.1 * runner.layout.nbytes, (decode, mem)
        before = runner.pool.unsafe_buffer_pointer()
        runner.execute(step)
        assert runner.pool.unsafe_buffer_pointer() == before


# --------------------------------------------------------------------------- units


def test_key_offsets_skip_the_slots_before_the_text():
    """Slots below a row's key offset hold no key (NaN here); the rest are positions
    0, 1, ... for every self kind's mask."""
    rng = np.random.default_rng(1)
    tpp, kvh, hd, offsets, texts = 4, 2, 8, np.array([5, 0, 3]), np.array([9, 6, 12])
    num_pages = 16
    pool = rng.normal(size=(num_pages, 2 * kvh * tpp * hd)).astype(np.float32)
    view = np.asarray(kind_view(pool, num_layers=1, kv_heads=kvh, tokens_per_page=tpp, head_dim=hd))
    perm = rng.permutation(num_pages)
    bt = np.full((3, 6), -1, np.int32)
    k = np.full((3, 12, kvh, hd), np.nan, np.float32)
    v = np.full_like(k, np.nan)
    used = 0
    for b, (off, n) in enumerate(zip(offsets, texts)):
        stream = off + n
        pages = perm[used : used + -(-stream // tpp)]
        used += len(pages)
        bt[b, : len(pages)] = pages
        view[pages, 0] = np.nan  # nothing below
        for s in range(off, stream):
            view[pages[s // tpp], 0, s % tpp, :kvh] = k[b, s - off] = rng.normal(size=(kvh, hd))
            view[pages[s // tpp], 0, s % tpp, kvh:] = v[b, s - off] = rng.normal(size=(kvh, hd))
    q = rng.normal(size=(3, 4, 4, hd)).astype(np.float32)
    q_pos = np.stack([np.arange(n - 4, n) for n in texts]).astype(np.int32)
    k_pos = np.where(np.arange(12)[None] < texts[:, None], np.arange(12)[None], -1)
    for kind, opt in (("full", {}), ("sliding", {"window": 3}), ("chunked", {"chunk": 5})):
        got = paged_attention(
            q, view, bt, offsets + texts, q_pos, layer=0, kind=kind, scale=0.3,
            key_offsets=offsets, **opt,
        )  # fmt: skip
        want = dense_attention(q, np.nan_to_num(k), np.nan_to_num(v), q_pos, k_pos, kind=kind,
                               scale=0.3, **opt)  # fmt: skip
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    bad = dict(layer=0, kind="full", scale=0.3)
    for ko, match in (
        (offsets[:2], "key_offsets must be"),
        (np.array([5, -1, 3]), "in \\[0, kv_lens\\]"),
        (offsets + 1, "q_positions must be < kv_lens - key_offsets"),
        (offsets.astype(np.float32), "integer array"),
    ):
        with pytest.raises(ValueError, match=match):
            paged_attention(q, view, bt, offsets + texts, q_pos, key_offsets=ko, **bad)
    with pytest.raises(ValueError, match="not 'cross'"):
        paged_attention(q, view, bt, offsets + texts, q_pos, layer=0, kind="cross", scale=0.3,
                        key_offsets=offsets)  # fmt: skip


def test_flat_state_view_writes_only_its_layer():
    dims = dict(d_inner=3, d_state=2, d_conv=3)  # 2 * 3 + 3 * 2 = 12 elements a layer
    pool = np.random.default_rng(2).normal(size=(4, 60)).astype(np.float32)  # pages of 30
    view = state_view(jnp.asarray(pool), layers_per_page=2, page_elems=30, **dims)
    assert view.shape == (8, 30)
    conv, ssm = np.ones((2, 3)), np.full((3, 2), 2.0)
    new = write_state(view, 5, 1, conv, ssm)
    want = pool.reshape(8, 30).copy()
    want[5, 12:24] = [1.0] * 6 + [2.0] * 6
    np.testing.assert_array_equal(new, want)
    c, s = read_state(new, np.array([5, -1]), 1, **dims)
    np.testing.assert_array_equal(c[0], conv)
    np.testing.assert_array_equal(s[1], 0.0)
    with pytest.raises(ValueError, match="layer must be an int in \\[0, 2\\)"):
        read_state(new, 5, 2, **dims)
    with pytest.raises(ValueError, match="view must be \\[pages, rows, lane\\] or"):
        read_state(new[None, None], 5, 0, **dims)


def test_paged_table_shifts_the_text_behind_the_images():
    """Literal tables: a 6 + 3 token image stream ahead of 5 text tokens (4 per page)."""
    layout = ModelLayout("t", (lk.full(1, 4, "float32"), lk.cross(1, 4, "float32")))
    plan = make_plan(layout, "paged", 4)
    m = KVCacheManager(layout, plan.large_page_bytes * 32, plan=plan)
    pool = PoolLayout.from_plan(plan, 32)
    assert pool.image_kinds == (0,) and pool.kinds[0].inline_images
    m.add_request("a", [7, 8, 9, 10, 11], images=[ImageInput("x", 6), ImageInput("y", 3)])
    assert m.allocate("a", 3)
    table, enc, image_rows = build_page_table(
        m, pool, [StepRow("a", 0, 3)], Buckets(), decode=False, max_seq_len=64
    )
    (entry,) = table.kinds
    pages = m.block_table("a", 0)  # stream [0, 12): 9 image tokens, 3 text tokens
    assert len(pages) == 3 and image_rows == (0,) and enc == 16
    np.testing.assert_array_equal(entry.key_offsets, [9])
    np.testing.assert_array_equal(entry.kv_lens, [12])
    np.testing.assert_array_equal(table.q_positions[0, :4], [0, 1, 2, -1])
    np.testing.assert_array_equal(entry.slot_pages[0, :3], [pages[2]] * 3)
    np.testing.assert_array_equal(entry.slot_offsets[0, :3], [1, 2, 3])
    np.testing.assert_array_equal(
        entry.image_slot_pages[0, :10], [*np.repeat(pages[:3], 4)[:9], -1]
    )
    np.testing.assert_array_equal(entry.image_slot_offsets[0, :9], np.arange(9) % 4)
    assert m.allocate("a", 2)  # the next chunk: text only
    table, enc, image_rows = build_page_table(
        m, pool, [StepRow("a", 3, 2)], Buckets(), decode=False, max_seq_len=64
    )
    (entry,) = table.kinds
    assert image_rows == () and enc == 0 and (entry.image_slot_pages == -1).all()
    np.testing.assert_array_equal(entry.kv_lens, [14])
    np.testing.assert_array_equal(entry.slot_offsets[0, :2], [0, 1])


# --------------------------------------------------------------------------- bad input


def test_pool_size_is_one_of_pages_or_budget():
    model = random_model("gemma3")
    plan = make_plan(model.cfg.layout(model.cfg.dtype), "uniform")
    runner = ModelRunner(model, allocator="uniform", kv_budget_bytes=plan.large_page_bytes * 11 - 1)
    assert runner.layout.num_large_pages == 10 and runner.plan.allocator == "uniform"
    with pytest.raises(ValueError, match="smaller than one large page"):
        ModelRunner(model, allocator="paged", kv_budget_bytes=1000)
    for kw in ({}, dict(num_large_pages=4, kv_budget_bytes=1 << 20)):
        with pytest.raises(ValueError, match="exactly one of num_large_pages, kv_budget_bytes"):
            ModelRunner(model, allocator="paged", **kw)
    with pytest.raises(ValueError, match="unknown allocator"):
        ModelRunner(model, allocator="vllm", num_large_pages=4)
    with pytest.raises(ValueError, match="tokens_per_page_multiple is for the jenga plan"):
        ModelRunner(model, allocator="paged", num_large_pages=4, tokens_per_page_multiple=8)


def test_plans_the_device_cannot_hold_are_refused():
    vision = random_model("llama-vision")
    with pytest.raises(ValueError, match="only the reference attention reads"):
        ModelRunner(vision, allocator="paged", num_large_pages=4, attention_backend="triton")
    mixed = ModelLayout("m", (lk.full(2, 16, "float32"), lk.sliding(32, 4, 16, "float32")))
    with pytest.raises(ValueError, match="one view needs one shape"):
        PoolLayout.from_plan(make_plan(mixed, "paged"), 4)
