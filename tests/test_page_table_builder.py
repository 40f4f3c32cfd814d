"""The numpy page-table builder and the shape buckets, with literal expected values."""

from __future__ import annotations

import numpy as np
import pytest

from jenga_jax.core import ImageInput, KVCacheManager, ModelLayout, make_plan
from jenga_jax.core import layer_kinds as lk
from jenga_jax.device.page_table import KindTable, StateTable
from jenga_jax.device.pool import PoolLayout
from jenga_jax.engine.buckets import Buckets
from jenga_jax.engine.page_table_builder import StepRow, build_page_table


def test_buckets_powers_of_two_and_explicit_sizes():
    b = Buckets()
    assert [b.batch_size(n) for n in (1, 2, 3, 5, 9)] == [1, 2, 4, 8, 16]
    assert [b.num_pages(n) for n in (0, 1, 4, 5)] == [4, 4, 4, 8]
    assert b.num_queries(3, decode=False) == 8 and b.num_queries(3, decode=True) == 1
    e = Buckets(batch=(2, 6), pages=(10,))
    assert [e.batch_size(n) for n in (1, 2, 3, 6)] == [2, 2, 6, 6]
    with pytest.raises(ValueError, match="batch of 7 exceeds the largest bucket 6"):
        e.batch_size(7)
    with pytest.raises(ValueError, match="block table of 11"):
        e.num_pages(11)


def _manager(*kinds, tpp=4):
    layout = ModelLayout("t", tuple(kinds))
    plan = make_plan(layout, "jenga", tpp, fixed_tokens_per_page=True)
    return KVCacheManager(layout, plan.large_page_bytes * 64, plan=plan), plan


def test_token_and_cross_tables():
    m, plan = _manager(lk.full(1, 4, "float32"), lk.cross(1, 4, "float32"))
    layout = PoolLayout.from_plan(plan, 64)
    cat, dog = ImageInput("cat", 6), ImageInput("dog", 3)
    m.add_request("a", list(range(10)), images=[cat, dog])
    assert m.allocate("a", 7)
    table, enc, image_rows = build_page_table(
        m, layout, [StepRow("a", 0, 7)], Buckets(), decode=False, max_seq_len=64
    )
    full, cross = table.kinds
    assert isinstance(full, KindTable) and isinstance(cross, KindTable)
    pages = m.block_table("a", 0)
    np.testing.assert_array_equal(table.q_positions[0], [0, 1, 2, 3, 4, 5, 6, -1])
    np.testing.assert_array_equal(full.kv_lens, [7])
    np.testing.assert_array_equal(full.slot_pages[0, :7], [pages[0]] * 4 + [pages[1]] * 3)
    np.testing.assert_array_equal(full.slot_offsets[0, :7], [0, 1, 2, 3, 0, 1, 2])
    assert (full.slot_pages[0, 7:] == -1).all()
    # Images: cat on pages 0-1 (4 + 2 tokens), dog on page 2 (3 tokens); 9 tokens written.
    cpages = m.block_table("a", 1)
    np.testing.assert_array_equal(cross.page_fill[0, :3], [4, 2, 3])
    assert cross.kv_lens[0] == 12 and enc == 16 and table.q_positions.shape[0] == 1
    assert image_rows == (0,)
    want = [cpages[0]] * 4 + [cpages[1]] * 2 + [cpages[2]] * 3
    np.testing.assert_array_equal(cross.slot_pages[0, :9], want)
    np.testing.assert_array_equal(cross.slot_offsets[0, :9], [0, 1, 2, 3, 0, 1, 0, 1, 2])
    # A second request with the same cat (cached) and a new bird: only the bird is written.
    m.add_request("b", [7, 8], images=[cat, ImageInput("bird", 2)])
    assert m.allocate("b", 2)
    table, enc, image_rows = build_page_table(
        m, layout, [StepRow("b", 0, 2)], Buckets(), decode=False, max_seq_len=64
    )
    assert image_rows == (0,)
    cross = table.kinds[1]
    bird = m.block_table("b", 1)[2]
    np.testing.assert_array_equal(cross.slot_pages[0, :8], [-1] * 6 + [bird] * 2)


def test_an_image_cached_in_one_cross_kind_only_is_written_in_the_other():
    """Each cross kind finds an image in its own cache: a row writes images if any kind
    must, and only into that kind's pages."""
    m, plan = _manager(
        lk.full(1, 4, "float32"), lk.cross(1, 4, "float32"), lk.cross(2, 4, "float32")
    )
    layout = PoolLayout.from_plan(plan, 64)
    first, second = layout.cross_kinds
    cat = ImageInput("cat", 6)
    m.add_request("a", [1, 2, 3], images=[cat])
    assert m.allocate("a", 3)
    cat_pages = m.block_table("a", second)
    m.free("a")
    m.alloc._evict(second, cat_pages[1])  # the second kind loses the image, the first keeps it
    m.add_request("b", [4, 5], images=[cat])
    assert m.allocate("b", 2)
    table, enc, image_rows = build_page_table(
        m, layout, [StepRow("b", 0, 2)], Buckets(), decode=False, max_seq_len=64
    )
    assert image_rows == (0,) and enc == 16
    assert (table.kinds[first].slot_pages[0] == -1).all()  # cached: nothing to write
    new = m.block_table("b", second)
    np.testing.assert_array_equal(
        table.kinds[second].slot_pages[0, :6], [new[0]] * 4 + [new[1]] * 2
    )


def test_state_tables_read_then_write():
    m, plan = _manager(lk.full(1, 4, "float32"), lk.state(40, 4, "float32"))
    layout = PoolLayout.from_plan(plan, 64, state_dims=(2, 3, 3))  # (3-1)*2 + 2*3 = 10 elems
    m.add_request("a", list(range(9)))
    assert m.allocate("a", 4)  # first step: zero state in, a new page out
    table, _, _ = build_page_table(
        m, layout, [StepRow("a", 0, 4)], Buckets(), decode=False, max_seq_len=64
    )
    state = table.kinds[1]
    assert isinstance(state, StateTable)
    first = m.block_table("a", 1)[1]
    np.testing.assert_array_equal(state.read_pages, [[-1]])
    np.testing.assert_array_equal(state.write_pages, [[first]])
    assert m.allocate("a", 3)  # 4 was a checkpoint: read it, write a new page
    table, _, _ = build_page_table(
        m, layout, [StepRow("a", 4, 3)], Buckets(), decode=False, max_seq_len=64
    )
    state = table.kinds[1]
    assert state.read_pages[0, 0] == first and state.write_pages[0, 0] not in (first, -1)


def test_rows_beyond_the_model_length_are_refused():
    m, plan = _manager(lk.full(1, 4, "float32"))
    layout = PoolLayout.from_plan(plan, 64)
    m.add_request("a", list(range(9)))
    assert m.allocate("a", 9)
    with pytest.raises(ValueError, match="beyond the model's maximum length 8"):
        build_page_table(m, layout, [StepRow("a", 0, 9)], Buckets(), decode=False, max_seq_len=8)
