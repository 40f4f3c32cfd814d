"""Page plans: what the jenga planner chooses, and properties every plan keeps."""

from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from jenga_jax.core import (
    ALLOCATORS,
    AttentionType,
    LayoutError,
    ModelLayout,
    get_layout,
    make_plan,
)
from jenga_jax.core import layer_kinds as lk


def test_jamba_state_split_per_layer_keeps_one_page_size():
    plan = make_plan(get_layout("jamba-1.5-mini", state_checkpoint_interval=512), "jenga")
    state, attn = plan.kinds
    assert (state.pages_per_state, state.page_bytes) == (28, 311_296)
    assert (attn.tokens_per_page, attn.page_bytes) == (19, 19 * 4 * 4096)
    assert plan.large_page_bytes == 311_296
    assert state.rule.checkpoint_interval == 513  # 512 rounded up to whole 19-token pages


def test_gemma3_splits_sliding_layers_into_groups_of_the_full_page():
    plan = make_plan(get_layout("gemma-3-4b"), "jenga")
    shapes = [(k.rule.type.value, k.num_layers, k.tokens_per_page) for k in plan.kinds]
    assert shapes == [("sliding", 5, 16)] * 5 + [("sliding", 4, 20), ("full", 5, 16)]
    assert {k.page_bytes for k in plan.kinds} == {plan.large_page_bytes}
    assert plan.hit_granularity == 80


def test_small_window_models_use_half_pages_everywhere():
    plan = make_plan(get_layout("gpt-oss-20b"), "jenga")
    assert [k.tokens_per_page for k in plan.kinds] == [8, 8]


def test_fixed_tokens_per_page_keeps_the_naive_lcm_plan():
    plan = make_plan(get_layout("jamba-1.5-mini"), "jenga", 16, fixed_tokens_per_page=True)
    assert plan.large_page_bytes == 34_865_152  # 4 states or 133 attention pages
    assert [k.tokens_per_page for k in plan.kinds] == [0, 16]


KINDS = st.sampled_from(
    [
        lk.full(1, 8),
        lk.full(2, 16),
        lk.sliding(64, 1, 8),
        lk.sliding(4096, 2, 8),
        lk.chunked(512, 1, 8),
        lk.cross(1, 8),
        lk.state(3 * 1024, 512),
        lk.state(5 * 1000),
    ]
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(KINDS, st.integers(1, 12)), min_size=1, max_size=3), st.data())
def test_every_plan_covers_each_layer_once_and_divides_the_large_page(parts, data):
    layers = [kind for kind, n in parts for _ in range(n)]
    layers = data.draw(st.permutations(layers))
    layout = ModelLayout("random", tuple(layers))
    for allocator in ALLOCATORS:
        plan = make_plan(layout, allocator, 16)
        covered = sorted(i for k in plan.kinds for i in k.layer_indices)
        assert covered == list(range(len(layers)))
        for k in plan.kinds:
            assert plan.large_page_bytes % k.page_bytes == 0
            if k.is_token_kind:
                assert k.tokens_per_page % plan.block_size == 0
        if allocator == "jenga":
            # Pages of 8 to 128 tokens (target 16: [target / 2, 8 x target]); a plan with
            # equal pages may go to 32 x target when a state kind makes hits coarse anyway.
            has_state = any(k.type is AttentionType.STATE for k in plan.kinds)
            most = 32 * 16 if has_state else 128
            assert all(8 <= k.tokens_per_page <= most for k in plan.kinds if k.is_token_kind)
            # With a state kind, hits come only at its checkpoints (never without them),
            # so the planner may use larger pages there.
            assert plan.hit_granularity <= 128 or any(
                k.type is AttentionType.STATE for k in plan.kinds
            )
            for k in plan.kinds:  # the rule of the pages is the layers' own kind
                same = {dataclasses.replace(k.rule, checkpoint_interval=None)}
                assert {
                    dataclasses.replace(layers[i], checkpoint_interval=None)
                    for i in k.layer_indices
                } == same


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(KINDS, st.integers(1, 12)), min_size=1, max_size=3),
    st.sampled_from([8, 16]),
)
def test_tokens_per_page_multiple_is_honoured(parts, multiple):
    """TPU kernels want page offsets in whole (8 or 16)-row tiles."""
    layout = ModelLayout("random", tuple(kind for kind, n in parts for _ in range(n)))
    plan = make_plan(layout, "jenga", 16, tokens_per_page_multiple=multiple)
    assert all(k.tokens_per_page % multiple == 0 for k in plan.kinds if k.is_token_kind)
    for k in plan.kinds:
        assert plan.large_page_bytes % k.page_bytes == 0


def test_tokens_per_page_multiple_must_divide_the_target():
    layout = ModelLayout("t", (lk.full(1, 4),))
    with pytest.raises(LayoutError, match="tokens_per_page_multiple"):
        make_plan(layout, "jenga", 16, tokens_per_page_multiple=5)
