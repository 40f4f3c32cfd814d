"""Exact cache-hit rules of each kind and the eviction order, with literal expected values."""

from __future__ import annotations

from jenga_jax.core import ImageInput, KVCacheManager, ModelLayout, make_plan
from jenga_jax.core import layer_kinds as lk
from jenga_jax.core.invariants import check_manager


def manager(*kinds, allocator="jenga", tpp=4, num_large=64):
    layout = ModelLayout("t", tuple(kinds))
    plan = make_plan(layout, allocator, tpp, fixed_tokens_per_page=True)
    return KVCacheManager(layout, plan.large_page_bytes * num_large, plan=plan)


def run(m, rid, prompt, chunks=None, images=()):
    """Prefill `prompt` in `chunks`, decode one token, finish."""
    m.add_request(rid, prompt, images=images)
    for n in chunks or [len(prompt)]:
        assert m.allocate(rid, n)
    assert m.allocate(rid, 1, [999])
    m.free(rid)
    check_manager(m)


A = list(range(100, 120))  # 20 distinct tokens


def test_full_attention_hits_every_page_of_the_prefix_never_the_whole_prompt():
    m = manager(lk.full(1, 4))
    run(m, "a", A[:10])  # pages [0-3] and [4-7] are full and cached; [8-11] is partial
    m.add_request("b", A[:8] + [1, 2])
    assert m.lookup("b") == 8
    m.add_request("c", A[:7] + [1, 2])
    assert m.lookup("c") == 4
    m.add_request("d", A[:8])  # a hit of 8 would leave no token to compute
    assert m.lookup("d") == 4
    m.add_request("e", [1] + A[1:10])
    assert m.lookup("e") == 0


def test_sliding_window_needs_only_the_pages_in_its_window():
    m = manager(lk.sliding(5, 1, 4))  # a query at L reads keys [L - 4, L)
    run(m, "a", A[:16] + [1])
    k = 0
    m.add_request("b", A[:16] + [2])
    hashes = m._requests["b"].hasher.hashes
    m.alloc._evict(k, m.alloc.cache[k][hashes[0]])  # drop tokens [0, 4)
    m.alloc._evict(k, m.alloc.cache[k][hashes[1]])  # drop tokens [4, 8)
    assert m.lookup("b") == 16  # needs [12, 16) only
    m.add_request("c", A[:12] + [3])
    assert m.lookup("c") == 12  # needs [8, 12): page 2 is there
    m.add_request("d", A[:8] + [3])
    assert m.lookup("d") == 0  # needs [4, 8): evicted, and L = 4 needs [0, 4): evicted


def test_chunked_local_needs_only_the_current_chunk():
    m = manager(lk.chunked(8, 1, 4))  # chunks [0, 8), [8, 16), ...
    run(m, "a", A[:20])
    m.add_request("b", A[:17] + [5])
    hashes = m._requests["b"].hasher.hashes
    for p in (0, 2):  # evict tokens [0, 4) and [8, 12)
        m.alloc._evict(0, m.alloc.cache[0][hashes[p]])
    assert m.lookup("b") == 16  # a chunk boundary: reads nothing older (its last page is there)
    m.add_request("c", A[:15] + [5])
    assert m.lookup("c") == 8  # L = 12 would need [8, 12), evicted; L = 8 is a boundary
    fresh = manager(lk.chunked(8, 1, 4))
    fresh.add_request("x", A[:20])
    assert fresh.lookup("x") == 0  # nothing cached: no hit, boundary or not


def test_state_kind_hits_only_at_a_saved_checkpoint():
    layers = (lk.full(1, 4), lk.state(32, checkpoint_interval=8))
    m = manager(*layers)
    run(m, "a", A[:20], chunks=[8, 8, 4])  # steps end at 8, 16: checkpoints saved there
    m.add_request("b", A[:20] + [7])
    assert m.lookup("b") == 16  # full attention could serve 20; the state only 16
    m2 = manager(*layers)
    run(m2, "a", A[:20])  # one step: no step ended on a checkpoint
    m2.add_request("b", A[:20] + [7])
    assert m2.lookup("b") == 0
    # The hit installs the checkpoint as the state to read and a new page to write.
    assert m.allocate("b", 5).num_cached_tokens == 16
    read, write = m.block_table("b", 1)
    assert read is not None and write is not None and read != write


def test_cross_attention_pages_are_keyed_by_image_and_shared():
    m = manager(lk.full(1, 4), lk.cross(1, 4))
    image = ImageInput("cat", 6, 0)  # 2 pages of 4 tokens
    m.add_request("a", A[:5], images=[image])
    assert m.allocate("a", 5)
    pages_a = m.block_table("a", 1)
    assert len(pages_a) == 2
    assert m.allocate("a", 1, [1])  # commits: the image pages enter the cache
    m.add_request("b", [7, 8, 9], images=[image])
    assert m.allocate("b", 3)
    assert m.block_table("b", 1) == pages_a
    assert m.alloc.ref[1][pages_a[0]] == 2
    check_manager(m)


def test_text_pages_after_cross_attention_depend_on_the_images():
    """A text token's K/V depends on the images it attended to: other images, no hit."""
    m = manager(lk.full(1, 4), lk.cross(1, 4))
    run(m, "a", A[:10], images=[ImageInput("cat", 6, 0)])
    m.add_request("same", A[:10], images=[ImageInput("cat", 6, 0)])
    assert m.lookup("same") == 8
    m.add_request("other", A[:10], images=[ImageInput("dog", 6, 0)])
    assert m.lookup("other") == 0
    m.add_request("none", A[:10])
    assert m.lookup("none") == 0


def test_the_first_step_writes_only_the_image_pages_it_took_new():
    m = manager(lk.full(1, 4), lk.cross(1, 4))
    cat, dog = ImageInput("cat", 6, 0), ImageInput("dog", 3, 0)
    m.add_request("a", A[:5], images=[cat])
    assert m.allocate("a", 5)
    assert m.cross_pages_to_write("a", 1) == [True, True]
    m.add_request("b", [7, 8, 9], images=[cat, dog])  # same step: cat is found
    assert m.allocate("b", 3)
    assert m.cross_pages_to_write("b", 1) == [False, False, True]
    assert m.encoder_token_counts("b") == [6, 3]
    assert m.allocate("a", 1, [1])  # a's step ran
    assert m.cross_pages_to_write("a", 1) == [False, False]
    check_manager(m)


def test_eviction_is_aligned_longest_prefix_first():
    m = manager(lk.full(1, 4), num_large=4)
    run(m, "a", A[:13])  # pages of [0,4) [4,8) [8,12) cached, one access time
    hashes = [m.alloc.key[0][p] for p in sorted(m.alloc.key[0])]
    assert len(hashes) == 3
    m.add_request("b", [1, 2, 3, 4, 5])  # needs 2 pages: 1 empty + 1 eviction
    assert m.allocate("b", 5)
    m.add_request("probe", A[:13])
    assert m.lookup("probe") == 8  # the tail page [8, 12) went first, [0, 8) survive


def test_eviction_is_balanced_one_time_per_request_across_kinds():
    layers = (lk.full(1, 4), lk.sliding(64, 1, 4))
    jenga = manager(*layers)
    run(jenga, "a", A[:13])
    times = {(k, jenga.alloc.ts[k][p]) for k in range(2) for p in jenga.alloc.key[k]}
    assert {t for _, t in times} == {jenga.alloc.ts[0][next(iter(jenga.alloc.key[0]))]}
    uniform = manager(*layers, allocator="uniform")
    run(uniform, "a", A[:13])
    order = sorted(
        (uniform.alloc.ts[k][p], k, uniform.alloc.tie[k][p], p)
        for k in range(uniform.num_kinds)
        for p in uniform.alloc.key[k]
    )
    # One global LRU in release order: kind 0's pages (tail first) all go before kind 1's.
    assert [k for _, k, _, _ in order] == [0, 0, 0, 1, 1, 1]
    assert len({t for t, _, _, _ in order}) == 6


def test_pages_of_one_image_are_evicted_together():
    m = manager(lk.full(1, 4), lk.cross(1, 4))
    m.add_request("a", A[:3], images=[ImageInput("dog", 12, 0)])  # 3 cross pages
    assert m.allocate("a", 3)
    m.free("a")
    cached = [p for p in m.alloc.key[1]]
    assert len(cached) == 3
    m.alloc._evict(1, cached[1])
    assert m.alloc.key[1] == {}
    assert m.alloc.ncached[1] == 0
    check_manager(m)


def test_out_of_window_pages_are_released_during_decode():
    m = manager(lk.sliding(8, 1, 4), num_large=64)
    m.add_request("a", A[:4])
    assert m.allocate("a", 4)
    for t in range(12):
        assert m.allocate("a", 1, [t])
    # 15 tokens computed, the next query (position 15) reads [8, 16): pages 0, 1 released.
    table = m.block_table("a", 0)
    assert table[:2] == [None, None] and None not in table[2:]
    assert m.stats().pages_per_kind == (2,)


def test_needed_bytes_count_shared_pages_once_and_only_live_tokens():
    m = manager(lk.full(1, 4), lk.sliding(6, 1, 4))  # 16 bytes per token per layer
    m.add_request("a", A[:10])
    assert m.allocate("a", 10)
    m.add_request("b", A[:8] + [1, 2, 3])
    assert m.allocate("b", 3).num_cached_tokens == 8  # shares pages [0, 8) of "a"
    # full: a's 10 tokens + b's own 3 = 13; sliding (a query at 10 or 11 reads 5 back):
    # a reads [4, 10) (n = 0 this step: all 10), b reads [3, 11) of which [3, 8) is shared
    # with a, so distinct = a's [0, 10) + b's [8, 11) = 13 as well.
    assert m.needed_bytes() == (13 + 13) * 16
    assert m.allocate("a", 1, [7])  # a computed 10 tokens: its window starts at 5
    # a: full [0, 11), sliding [5, 11); b: full [8, 11) own, sliding [3, 11) with [3, 8) shared
    # sliding distinct: pages [0,4) -> from 3 (b) = 1; [4,8) = 4; a's [8, 11) = 3; b's [8, 11) = 3
    assert m.needed_bytes() == ((11 + 3) + (1 + 4 + 3 + 3)) * 16


def test_extra_keys_salt_adapter_and_inline_images_separate_caches():
    m = manager(lk.full(1, 4))
    m.add_request("a", A[:12], salt="tenant-1", adapter="lora-x")
    assert m.allocate("a", 12)
    m.add_request("same", A[:12] + [1], salt="tenant-1", adapter="lora-x")
    assert m.lookup("same") == 12
    m.add_request("other-tenant", A[:12] + [1], salt="tenant-2", adapter="lora-x")
    assert m.lookup("other-tenant") == 0
    m.add_request("other-adapter", A[:12] + [1], salt="tenant-1", adapter="lora-y")
    assert m.lookup("other-adapter") == 0
    # In-sequence images: equal placeholder ids, different content -> different pages.
    m.add_request("cat", A[:12], images=[ImageInput("cat", 4, 4)])
    assert m.allocate("cat", 12)
    m.add_request("cat-again", A[:12] + [1], images=[ImageInput("cat", 4, 4)])
    assert m.lookup("cat-again") == 12
    m.add_request("dog", A[:12] + [1], images=[ImageInput("dog", 4, 4)])
    assert m.lookup("dog") == 4  # the page before the image is shared, the rest is not


def test_never_fits_check_accounts_for_the_prefill_chunk():
    import pytest

    from jenga_jax.core.errors import RequestTooLargeError

    m = manager(lk.sliding(8, 1, 4), num_large=8)  # a window needs 3-4 pages of 4 tokens
    with pytest.raises(RequestTooLargeError, match="never fit"):
        m.add_request("whole", list(range(40)))  # one 40-token step writes 10 pages
    m.add_request("chunked", list(range(40)), prefill_chunk=8, max_new_tokens=100)
    for _ in range(5):
        assert m.allocate("chunked", 8)
    for t in range(100):
        assert m.allocate("chunked", 1, [t])


def test_pages_a_running_window_left_behind_count_as_accessed_at_its_latest_step():
    m = manager(lk.sliding(8, 1, 4))
    m.add_request("a", A[:16])
    assert m.allocate("a", 16)
    assert m.allocate("a", 1, [1])  # commits 16 tokens: pages [0, 4) and [4, 8) released
    released = [p for p in m.alloc.key[0] if m.alloc.ref[0][p] == 0]
    assert len(released) == 2
    run(m, "b", [7] * 12)  # finishes later: its pages get a newer access time
    b_pages = {p for p in m.alloc.key[0] if m.alloc.ref[0][p] == 0} - set(released)
    assert m.allocate("a", 1, [2])  # "a" runs on: its left-behind pages are newer than b's
    for _ in range(len(b_pages)):
        assert m.alloc._evict_lru_large()
    assert set(released) <= set(m.alloc.key[0])  # b's pages went first
    assert not b_pages & set(m.alloc.key[0])
    check_manager(m)
