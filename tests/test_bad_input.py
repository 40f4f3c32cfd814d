"""Bad input gets a clear error of the documented type, and changes nothing."""

from __future__ import annotations

import copy

import pytest

from jenga_jax.core import (
    ImageInput,
    KVCacheManager,
    LayerKind,
    LayoutError,
    ModelLayout,
    RequestError,
    RequestTooLargeError,
    get_layout,
    make_plan,
)
from jenga_jax.core.invariants import check_manager
from jenga_jax.core.layer_kinds import CHUNKED, CROSS, FULL, SLIDING, STATE

LLAMA = get_layout("llama-3.1-8b")
LLAMA_LARGE = make_plan(LLAMA).large_page_bytes  # 16 tokens x 32 layers x 4096 B
VISION = get_layout("llama-3.2-11b-vision")


def _manager(layout=LLAMA, large_pages: int = 10, **kw) -> KVCacheManager:
    plan = make_plan(layout, kw.pop("allocator", "jenga"), fixed_tokens_per_page=True)
    return KVCacheManager(layout, plan.large_page_bytes * large_pages, plan=plan, **kw)


def _snapshot(m: KVCacheManager):
    a = m.alloc
    return (
        m.stats(),
        list(a.nfree),
        a.num_empty,
        list(a.nheld),
        list(a.ncached),
        sorted(m._requests),
        {rid: m.num_tokens(rid) for rid in m._requests},
    )


def _prompt(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


# ---------------------------------------------------------------------- layer kinds


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"type": FULL, "num_kv_heads": 8, "head_dim": 128, "dtype": "float64"}, "'float64'"),
        ({"type": SLIDING, "num_kv_heads": 8, "head_dim": 128, "window": 0}, "got 0"),
        ({"type": SLIDING, "num_kv_heads": 8, "head_dim": 128, "window": -16}, "got -16"),
        ({"type": SLIDING, "num_kv_heads": 8, "head_dim": 128}, "got None"),
        ({"type": CHUNKED, "num_kv_heads": 8, "head_dim": 128, "chunk": 0}, "got 0"),
        ({"type": FULL, "num_kv_heads": 8, "head_dim": 0}, "got 8 and 0"),
        ({"type": CROSS, "num_kv_heads": 0, "head_dim": 64}, "got 0 and 64"),
        ({"type": STATE, "state_bytes": 0}, "got 0"),
        ({"type": STATE, "state_bytes": 1024, "checkpoint_interval": -4}, "got -4"),
        ({"type": FULL, "num_kv_heads": 8, "head_dim": 128, "window": 4096}, "on full"),
        ({"type": CROSS, "num_kv_heads": 8, "head_dim": 128, "chunk": 64}, "on cross"),
    ],
)
def test_layer_kind_errors(kwargs, needle):
    with pytest.raises(LayoutError) as info:
        LayerKind(**kwargs)
    assert needle in str(info.value)


def test_layer_kind_error_names_the_field():
    with pytest.raises(LayoutError, match="window"):
        LayerKind(SLIDING, 8, 128, window=0)
    with pytest.raises(LayoutError, match="chunk"):
        LayerKind(CHUNKED, 8, 128, chunk=0)
    with pytest.raises(LayoutError, match="state_bytes"):
        LayerKind(STATE, state_bytes=0)
    with pytest.raises(LayoutError, match="checkpoint_interval"):
        LayerKind(STATE, state_bytes=8, checkpoint_interval=-1)
    with pytest.raises(LayoutError, match="AttentionType"):
        LayerKind("full", 8, 128)


def test_empty_layout_and_bad_layers():
    with pytest.raises(LayoutError, match="'nothing' has no layers"):
        ModelLayout("nothing", ())
    with pytest.raises(LayoutError, match="layer 1 of 'odd'"):
        ModelLayout("odd", (LLAMA.layers[0], "full"))


@pytest.mark.parametrize("allocator", ["buddy", "Jenga", ""])
def test_make_plan_unknown_allocator(allocator):
    with pytest.raises(LayoutError) as info:
        make_plan(LLAMA, allocator)
    assert repr(allocator) in str(info.value)
    assert "jenga" in str(info.value)


@pytest.mark.parametrize("tpp", [0, -16, 1.5])
def test_make_plan_bad_tokens_per_page(tpp):
    with pytest.raises(LayoutError) as info:
        make_plan(LLAMA, "jenga", tpp)
    assert f"got {tpp!r}" in str(info.value)


# ---------------------------------------------------------------------- manager setup


@pytest.mark.parametrize("budget", [0, 1, LLAMA_LARGE - 1])
def test_budget_below_one_large_page(budget):
    with pytest.raises(RequestError) as info:
        KVCacheManager(LLAMA, budget)
    message = str(info.value)
    assert f"{budget:,} B" in message
    assert "2,097,152 B" in message
    assert "llama-3.1-8b" in message
    m = KVCacheManager(LLAMA, LLAMA_LARGE)  # exactly one large page is fine
    assert m.alloc.num_large == 1


# ---------------------------------------------------------------------- add_request


def _seeded_manager() -> KVCacheManager:
    """A manager with one running and one waiting request, so 'unchanged' means something."""
    m = _manager()
    m.add_request("run", _prompt(40))
    assert m.allocate("run", 40).ok
    m.add_request("wait", _prompt(20, 500))
    return m


@pytest.mark.parametrize(
    "rid, prompt, kwargs, needle",
    [
        ("e", [], {}, "'e' has an empty prompt"),
        ("n", [1, 2, -3], {}, "got -3"),
        ("f", [1, 2.0, 3], {}, "got 2.0"),
        ("s", [1, "7"], {}, "got '7'"),
        ("b", [1, True], {}, "got True"),
        ("run", [1, 2, 3], {}, "'run' already exists"),
        ("wait", [1, 2, 3], {}, "'wait' already exists"),
        ("m", [1, 2, 3], {"max_new_tokens": -1}, "max_new_tokens"),
        ("i", [1, 2, 3], {"images": ["not-an-image"]}, "'not-an-image'"),
    ],
)
def test_add_request_errors(rid, prompt, kwargs, needle):
    m = _seeded_manager()
    before = _snapshot(m)
    with pytest.raises(RequestError) as info:
        m.add_request(rid, prompt, **kwargs)
    assert needle in str(info.value)
    assert _snapshot(m) == before
    if rid not in ("run", "wait"):
        assert rid not in m


def test_inline_image_beyond_prompt():
    m = _seeded_manager()
    before = _snapshot(m)
    with pytest.raises(RequestError) as info:
        m.add_request("img", _prompt(8), images=[ImageInput("cat.png", 6, offset=4)])
    assert "'cat.png'" in str(info.value)
    assert "[4, 10)" in str(info.value)
    assert "8-token prompt" in str(info.value)
    assert _snapshot(m) == before
    assert "img" not in m
    # the same image inside the prompt is fine
    m.add_request("img", _prompt(10), images=[ImageInput("cat.png", 6, offset=4)])
    assert m.num_tokens("img") == 10


def test_request_that_never_fits_is_rejected_and_not_registered():
    m = _manager(large_pages=3)  # 3 x 16 tokens
    m.add_request("small", _prompt(10))
    before = _snapshot(m)
    with pytest.raises(RequestTooLargeError) as info:
        m.add_request("big", _prompt(1000))
    message = str(info.value)
    assert "'big'" in message and "63 large pages" in message and "pool has 3" in message
    assert isinstance(info.value, RequestError)
    assert _snapshot(m) == before
    assert "big" not in m
    with pytest.raises(RequestError, match="unknown request 'big'"):
        m.free("big")
    # max_new_tokens counts too: 40 + 9 = 49 tokens need 4 pages of 16
    with pytest.raises(RequestTooLargeError, match="49 tokens"):
        m.add_request("grows", _prompt(40), max_new_tokens=9)
    assert "grows" not in m
    m.add_request("fits", _prompt(40), max_new_tokens=8)  # 48 tokens: exactly 3 pages
    assert _snapshot(m)[0] == before[0]


# ---------------------------------------------------------------------- wrong ids, wrong states


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.free("ghost"),
        lambda m: m.preempt("ghost"),
        lambda m: m.allocate("ghost", 4),
        lambda m: m.lookup("ghost"),
        lambda m: m.block_table("ghost", 0),
    ],
)
def test_unknown_request_id(call):
    m = _seeded_manager()
    before = _snapshot(m)
    with pytest.raises(RequestError, match="unknown request 'ghost'"):
        call(m)
    assert _snapshot(m) == before


def test_free_twice_and_allocate_after_free():
    m = _seeded_manager()
    m.free("run")
    after_free = _snapshot(m)
    assert after_free[0].num_running == 0
    with pytest.raises(RequestError, match="unknown request 'run'"):
        m.free("run")
    with pytest.raises(RequestError, match="unknown request 'run'"):
        m.allocate("run", 1)
    with pytest.raises(RequestError, match="unknown request 'run'"):
        m.preempt("run")
    assert _snapshot(m) == after_free


def test_preempt_of_waiting_request():
    m = _seeded_manager()
    before = _snapshot(m)
    with pytest.raises(RequestError, match="'wait' is not running"):
        m.preempt("wait")
    assert _snapshot(m) == before
    assert m.allocate("wait", 20).ok  # still usable


def test_lookup_of_running_request():
    m = _seeded_manager()
    before = _snapshot(m)
    with pytest.raises(RequestError, match="'run' is running"):
        m.lookup("run")
    assert _snapshot(m) == before


@pytest.mark.parametrize("rid", ["run", "wait"])
@pytest.mark.parametrize("n", [0, -1])
def test_allocate_non_positive_tokens(rid, n):
    m = _seeded_manager()
    before = _snapshot(m)
    with pytest.raises(RequestError, match=f"got {n}"):
        m.allocate(rid, n)
    assert _snapshot(m) == before
    with pytest.raises(RequestError, match="got 0"):
        m.allocate(rid, 0, [5])  # the token ids are not appended either
    assert _snapshot(m) == before


@pytest.mark.parametrize("bad", [-1, 1.0, "x", None])
def test_allocate_bad_new_token_ids(bad):
    m = _seeded_manager()
    before = _snapshot(m)
    with pytest.raises(RequestError, match=f"got {bad!r}"):
        m.allocate("run", 2, [7, bad])
    assert _snapshot(m) == before
    assert m.num_tokens("run") == 40


def test_allocate_beyond_known_tokens_of_waiting_request():
    m = _seeded_manager()
    before = _snapshot(m)
    with pytest.raises(RequestError) as info:
        m.allocate("wait", 21)
    assert "21 new tokens" in str(info.value) and "20 known tokens" in str(info.value)
    assert _snapshot(m) == before
    assert not m.is_running("wait")
    assert m.allocate("wait", 20).ok


def test_allocate_beyond_known_tokens_of_running_request():
    m = _seeded_manager()
    before = _snapshot(m)
    with pytest.raises(RequestError) as info:
        m.allocate("run", 1)  # all 40 prompt tokens were allocated; no token passed
    assert "up to 41" in str(info.value) and "only 40 are known" in str(info.value)
    assert "pass the new token ids" in str(info.value)
    assert _snapshot(m) == before
    assert m.allocate("run", 1, [9]).ok
    assert m.num_tokens("run") == 41


# Regression: allocate() used to append `new_token_ids` before validating the call, so
# a call that raised still grew the request (a retry appended the token twice).
def test_failed_allocate_does_not_append_new_token_ids():
    m = _seeded_manager()
    m.add_request("c", [1, 2, 3])
    before = _snapshot(m)
    with pytest.raises(RequestError, match="4 known tokens"):
        m.allocate("c", 10, [4])
    assert m.num_tokens("c") == 3
    assert _snapshot(m) == before


# ---------------------------------------------------------------------- refusals


def test_refusal_changes_nothing():
    m = KVCacheManager(LLAMA, make_plan(LLAMA, "jenga").large_page_bytes * 10)
    assert m.alloc.num_large == 10
    m.add_request("a", _prompt(100))
    assert m.allocate("a", 100).ok  # 7 of the 10 pages (16 tokens each)
    m.add_request("b", _prompt(80, 1000))  # needs 5 pages, 3 remain
    before = _snapshot(m)
    ts = copy.deepcopy(m.alloc.ts)
    assert before[2] == 3 and before[0].num_running == 1
    result = m.allocate("b", 80)
    assert result.ok is False
    assert not result
    assert "not enough free pages" in result.reason
    assert "full-8x128-bfloat16: 5" in result.reason
    assert "3 empty large pages" in result.reason
    assert result.num_cached_tokens == 0
    assert _snapshot(m) == before
    assert m.alloc.ts == ts
    assert not m.is_running("b")
    check_manager(m)
    m.free("b")
    assert "b" not in m
    assert _snapshot(m)[0] == before[0]
    # and the pool still serves a request that fits
    m.add_request("c", _prompt(48, 2000))
    assert m.allocate("c", 48).ok
    assert m.stats().empty_bytes == 0
    check_manager(m)


def test_refusal_of_running_request_changes_nothing():
    m = _manager(large_pages=4)
    m.add_request("a", _prompt(64))
    assert m.allocate("a", 64).ok  # all 4 pages
    before = _snapshot(m)
    result = m.allocate("a", 1, [5])
    assert not result.ok and "not enough free pages" in result.reason
    assert m.stats() == before[0]
    assert m.alloc.nfree == before[1] and m.alloc.num_empty == before[2]
    check_manager(m)


# Regression: a refused allocation used to keep the `new_token_ids` it was given,
# although a refusal must change nothing (the scheduler retries the same call).
def test_refusal_does_not_append_new_token_ids():
    m = _manager(large_pages=4)
    m.add_request("a", _prompt(64))
    assert m.allocate("a", 64).ok
    assert not m.allocate("a", 1, [5]).ok
    assert m.num_tokens("a") == 64
    assert not m.allocate("a", 1, [5]).ok
    assert m.num_tokens("a") == 64


def _image_pool(refuse: bool) -> KVCacheManager:
    """8 large pages: an old cached prompt, a newer cached prompt + image, one running."""
    m = _manager(VISION, large_pages=8)
    image = ImageInput("photo", 40)  # 3 cross pages of 16 tokens
    m.add_request("old", _prompt(33, 1000))
    assert m.allocate("old", 33).ok
    m.free("old")  # 2 full pages cached (the oldest)
    m.add_request("a", _prompt(64), images=[image])
    assert m.allocate("a", 64).ok
    m.free("a")  # 4 full pages + the image's 3 cross pages cached (newer)
    m.add_request("fill", _prompt(16, 500))
    assert m.allocate("fill", 16).ok
    m.add_request("b", _prompt(64) + _prompt(44, 900), images=[image])
    assert m.lookup("b") == 64
    if refuse:
        before = _snapshot(m)
        result = m.allocate("b", 44)  # hit 64 + 3 more pages; 2 evictable are not enough
        assert not result.ok and "not enough free pages" in result.reason
        assert _snapshot(m) == before
        check_manager(m)
    m.add_request("n", _prompt(16, 2000))
    assert m.allocate("n", 16).ok  # no empty large page: evicts the LRU one
    return m


def test_image_pool_without_refusal_evicts_the_oldest_page():
    m = _image_pool(refuse=False)
    assert m.stats().cached_pages_per_kind == (5, 3)
    assert m.stats().evicted_pages == 1


# Regression: a refused first allocation that found the request's image in the cache
# used to put the image pages back with access time 0.0, so they were evicted first.
# Expected: the same eviction as without the refusal (cached pages (5, 3), 1 evicted).
def test_refusal_keeps_the_cached_image_access_time():
    m = _image_pool(refuse=True)
    assert m.stats().cached_pages_per_kind == (5, 3)
    assert m.stats().evicted_pages == 1


# Regression: a float token count used to fail deep inside with TypeError after the
# image's cross pages were taken, leaking them. Expected: RequestError, nothing changed.
def test_non_integer_token_count_is_rejected_cleanly():
    m = _manager(VISION, large_pages=10)
    m.add_request("a", _prompt(20), images=[ImageInput("img", 40)])
    before = _snapshot(m)
    with pytest.raises(RequestError, match="2.5"):
        m.allocate("a", 2.5)
    assert _snapshot(m) == before
    m.free("a")
    assert m.stats().pages_per_kind == (0, 0)
