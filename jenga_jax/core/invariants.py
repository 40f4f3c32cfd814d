"""Full consistency check of a KV cache manager (slow: for tests and debugging)."""

from __future__ import annotations

from collections import Counter

from jenga_jax.core.allocator import EVICTABLE, FREE, HELD
from jenga_jax.core.kv_cache_manager import CROSS, STATE, KVCacheManager


class InvariantError(AssertionError):
    pass


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InvariantError(msg)


def held_pages(manager: KVCacheManager) -> Counter:
    """(kind, page) -> how many running requests hold it, from the request records."""
    held: Counter = Counter()
    for req in manager._requests.values():
        if not req.running:
            continue
        for k in range(manager.num_kinds):
            t = manager._type[k]
            if t is CROSS:
                pages = req.cross_pages[k]
            elif t is STATE:
                pages = list(req.pages[k]) + list(req.cur[k] or ())
            else:
                pages = req.pages[k]
            for p in pages:
                if p is not None:
                    held[(k, p)] += 1
    return held


def check_manager(manager: KVCacheManager) -> None:
    """Raise InvariantError unless every page and counter is consistent."""
    alloc = manager.alloc
    held = held_pages(manager)
    counts = Counter()
    for k, r in enumerate(alloc.ratio):
        for p in range(alloc.num_large * r):
            state = alloc.state(k, p)
            big = p // r
            _check(
                alloc.ref[k][p] == held.get((k, p), 0),
                f"kind {k} page {p}: ref {alloc.ref[k][p]} but {held.get((k, p), 0)} holders",
            )
            if state != FREE:
                _check(
                    alloc.lkind[big] == k,
                    f"kind {k} page {p} in large page {big} of kind {alloc.lkind[big]}",
                )
            if alloc.lkind[big] == k:
                counts[(big, state)] += 1
            if state == EVICTABLE or (state == HELD and p in alloc.key[k]):
                key = alloc.key[k][p]
                _check(alloc.cache[k].get(key) == p, f"kind {k} page {p}: key maps elsewhere")
    for k in range(len(alloc.ratio)):
        for key, p in alloc.cache[k].items():
            _check(alloc.key[k].get(p) == key, f"kind {k}: cache key of page {p} not mirrored")
    empty = set(alloc.empty)
    _check(len(empty) == len(alloc.empty), "a large page is twice in the empty list")
    nfree = [0] * len(alloc.ratio)
    ncached = [0] * len(alloc.ratio)
    nheld = [0] * len(alloc.ratio)
    nzero = [0] * len(alloc.ratio)
    for big in range(alloc.num_large):
        k = alloc.lkind[big]
        if k < 0:
            _check(big in empty, f"large page {big} is unsplit but not in the pool")
            continue
        r = alloc.ratio[k]
        f, c, h = counts[(big, FREE)], counts[(big, EVICTABLE)], counts[(big, HELD)]
        _check(f + c + h == r, f"large page {big}: {f}+{c}+{h} small pages != {r}")
        _check(big not in empty, f"large page {big} is split and in the pool")
        _check(f < r, f"large page {big} has all small pages free but is not back in the pool")
        _check(
            sorted(alloc.lfree[big])
            == sorted(p for p in range(big * r, (big + 1) * r) if alloc.state(k, p) == FREE),
            f"large page {big}: free list differs from free pages",
        )
        _check(
            alloc.lheld[big] == h and alloc.lcached[big] == c,
            f"large page {big}: counters {alloc.lheld[big]}/{alloc.lcached[big]} != {h}/{c}",
        )
        _check((big in alloc.partial[k]) == (f > 0), f"large page {big}: partial set is wrong")
        nfree[k] += f
        ncached[k] += c
        nheld[k] += h
        nzero[k] += h == 0
    _check(nfree == alloc.nfree, f"free counters {alloc.nfree} != {nfree}")
    _check(ncached == alloc.ncached, f"cached counters {alloc.ncached} != {ncached}")
    _check(nheld == alloc.nheld, f"held counters {alloc.nheld} != {nheld}")
    _check(nzero == alloc.nzero, f"zero-held counters {alloc.nzero} != {nzero}")
    stats = manager.stats()
    used = sum((nfree[k] + ncached[k] + nheld[k]) * alloc.page_bytes[k] for k in range(len(nfree)))
    _check(used + stats.empty_bytes == stats.pool_bytes, "bytes do not add up to the pool")
    _check(
        stats.held_bytes + stats.cached_only_bytes + stats.empty_bytes == stats.pool_bytes,
        "held + cached + empty != pool",
    )
    _check(
        stats.needed_bytes <= stats.running_bytes,
        f"needed {stats.needed_bytes} > held by running {stats.running_bytes}",
    )


def assert_pool_whole(manager: KVCacheManager) -> None:
    """After everything finished and the cache was reset: no page is in use."""
    alloc = manager.alloc
    _check(
        alloc.num_empty == alloc.num_large,
        f"{alloc.num_large - alloc.num_empty} large pages still split: a leak",
    )
    _check(not any(alloc.cache), "cache not empty after reset")
