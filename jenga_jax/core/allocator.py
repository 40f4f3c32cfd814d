"""The two-level LCM allocator with the prefix cache's page registry.

The pool is `num_large` large pages of `large_bytes` each. A large page is split on
demand into the small pages of exactly one kind (`large_bytes // page_bytes[k]` of
them) and goes back to the pool when all its small pages are free. Small page `p` of
kind `k` lives in large page `p // ratio[k]`.

Every small page is in exactly one state:
  free       not in the cache and held by no request;
  held       `ref[k][p] > 0` (it may also carry a cache key, shared by several requests);
  evictable  `ref == 0` with a cache key: a cached page that eviction may reclaim.

A kind gets a small page in the request-aware order of Jenga (section 2.1):
  1. a free small page in a large page this request split;
  2. an empty large page;
  3. evict a whole evictable large page (LRU by the newest access among its pages,
     then the longer prefix first);
  4. any free small page of this kind;
  5. evict a single small page of this kind (LRU, longer prefix first on ties).
`feasible` tells exactly whether a set of demands can be met, so that an allocation
is refused before anything changes; `take` then never fails, because when the
demands leave no spare large page it only uses slots that do not cost one.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Hashable, Sequence

FREE, HELD, EVICTABLE = "free", "held", "evictable"


class TwoLevelAllocator:
    def __init__(
        self,
        page_bytes: Sequence[int],
        large_bytes: int,
        num_large: int,
        *,
        shuffle_seed: int | None = None,
    ):
        for b in page_bytes:
            if b <= 0 or large_bytes % b:
                raise ValueError(f"page size {b} does not divide the large page {large_bytes}")
        self.page_bytes = tuple(page_bytes)
        self.large_bytes = large_bytes
        self.num_large = num_large
        self.ratio = tuple(large_bytes // b for b in page_bytes)
        kinds = range(len(page_bytes))
        # Small pages, per kind.
        self.ref = [[0] * (num_large * r) for r in self.ratio]
        self.key: list[dict[int, Hashable]] = [{} for _ in kinds]  # page -> cache key
        self.cache: list[dict[Hashable, int]] = [{} for _ in kinds]  # cache key -> page
        self.group: list[dict[int, Hashable]] = [{} for _ in kinds]  # page -> eviction group
        self.group_pages: list[dict[Hashable, set[int]]] = [{} for _ in kinds]
        self.ts = [[0.0] * (num_large * r) for r in self.ratio]  # last access (evictable)
        self.tie = [[0] * (num_large * r) for r in self.ratio]  # eviction tie-break
        self.ver = [[0] * (num_large * r) for r in self.ratio]  # invalidates heap entries
        self.evict_heap: list[list[tuple]] = [[] for _ in kinds]
        # Large pages.
        self.lkind = [-1] * num_large
        self.lfree: list[list[int]] = [[] for _ in range(num_large)]
        self.lheld = [0] * num_large
        self.lcached = [0] * num_large
        self.lowner: list[object] = [None] * num_large
        self.lver = [0] * num_large
        self.empty = list(range(num_large - 1, -1, -1))  # stack, page 0 on top
        if shuffle_seed is not None:  # random placement (tests: nothing may rely on order)
            random.Random(shuffle_seed).shuffle(self.empty)
        self.partial: list[dict[int, None]] = [{} for _ in kinds]  # ordered set of large ids
        self.large_heap: list[tuple] = []
        # Counters, per kind.
        self.nfree = [0 for _ in kinds]  # free slots inside split large pages
        self.ncached = [0 for _ in kinds]  # evictable pages
        self.nheld = [0 for _ in kinds]
        self.nzero = [0 for _ in kinds]  # split large pages with no held page
        self.evicted_pages = 0
        # Balanced eviction: an evictable page released by a still-running request (out
        # of its window) counts as accessed at that request's latest step. `owner` maps
        # such pages to their request; `last_access(owner)` (set by the manager) gives
        # that step, or None once the request is gone. Refreshed lazily, on eviction.
        self.owner: list[dict[int, object]] = [{} for _ in kinds]
        self.last_access = lambda owner: None

    # ------------------------------------------------------------------ queries
    def state(self, k: int, p: int) -> str:
        if self.ref[k][p] > 0:
            return HELD
        if p in self.key[k]:
            return EVICTABLE
        return FREE

    def lookup(self, k: int, key: Hashable) -> int | None:
        """The cached page of kind k with this key, or None."""
        return self.cache[k].get(key)

    @property
    def num_empty(self) -> int:
        return len(self.empty)

    def _spare_large(self, demand: Sequence[int]) -> int:
        """Large pages left over once `demand[k]` more pages of every kind are met.

        Negative means the demands cannot be met. Exact: slots in large pages that
        hold a page are usable by their kind only; every large page without a held
        page can be emptied (by eviction) and split for any kind.
        """
        need = 0
        pool = len(self.empty)
        for k, d in enumerate(demand):
            pool += self.nzero[k]
            if d:
                r = self.ratio[k]
                stuck = self.nfree[k] + self.ncached[k] - r * self.nzero[k]
                if d > stuck:
                    need += -(-(d - stuck) // r)
        return pool - need

    def feasible(self, demand: Sequence[int]) -> bool:
        return self._spare_large(demand) >= 0

    # ------------------------------------------------------------------ taking
    def take(self, k: int, owner: object, owned: list[int], demand: list[int]) -> int:
        """One small page of kind k for `owner`, held once (ref = 1).

        `owned` is the owner's stack of large pages it split (kept by the caller);
        `demand` the pages still to take per kind in this allocation, this one
        included; it is decremented. The caller checked `feasible(demand)` first.
        """
        restricted = (
            len(self.empty) < sum(demand)  # else every remaining page could take a large one
            and self._spare_large(demand) == 0
            and self._stuck_need(k, demand) == 0
        )
        demand[k] -= 1
        # 1. a free slot in a large page this owner split
        while owned:
            big = owned[-1]
            if self.lkind[big] != k or self.lowner[big] is not owner:
                owned.pop()
            elif self.lfree[big] and not (restricted and self.lheld[big] == 0):
                return self._take_slot(k, big)
            else:
                owned.pop()
        if not restricted:
            # 2. an empty large page; 3. evict a whole evictable large page
            if self.empty or self._evict_lru_large():
                big = self.empty.pop()
                self._split(big, k, owner)
                owned.append(big)
                return self._take_slot(k, big)
        # 4. any free slot of this kind
        for big in self.partial[k]:
            if not (restricted and self.lheld[big] == 0):
                return self._take_slot(k, big)
        # 5. evict one page of this kind, LRU
        p = self._evict_lru_page(k, restricted)
        big = p // self.ratio[k]
        if self.lkind[big] == k:
            return self._take_slot(k, big, p)
        big = self.empty.pop()  # eviction emptied its large page
        self._split(big, k, owner)
        owned.append(big)
        return self._take_slot(k, big)

    def _stuck_need(self, k: int, demand: Sequence[int]) -> int:
        """Large pages kind k still needs beyond the slots stuck in its held pages."""
        r = self.ratio[k]
        stuck = self.nfree[k] + self.ncached[k] - r * self.nzero[k]
        return max(0, -(-(demand[k] - stuck) // r))

    def _split(self, big: int, k: int, owner: object) -> None:
        r = self.ratio[k]
        self.lkind[big] = k
        self.lowner[big] = owner
        self.lfree[big] = list(range((big + 1) * r - 1, big * r - 1, -1))
        self.lver[big] += 1
        self.partial[k][big] = None
        self.nfree[k] += r
        self.nzero[k] += 1

    def _take_slot(self, k: int, big: int, p: int | None = None) -> int:
        free = self.lfree[big]
        if p is None:
            p = free.pop()
        else:
            free.remove(p)
        if not free:
            self.partial[k].pop(big, None)
        self.nfree[k] -= 1
        self._hold_new(k, big)
        self.ref[k][p] = 1
        return p

    def _hold_new(self, k: int, big: int) -> None:
        if self.lheld[big] == 0:
            self.nzero[k] -= 1
            self.lver[big] += 1  # no longer wholly evictable
        self.lheld[big] += 1
        self.nheld[k] += 1

    # ------------------------------------------------------------------ sharing
    def share(self, k: int, p: int) -> None:
        """A request reuses cached page p (a prefix-cache hit): one more holder."""
        ref = self.ref[k]
        if ref[p] == 0:
            big = p // self.ratio[k]
            self.ncached[k] -= 1
            self.lcached[big] -= 1
            self.ver[k][p] += 1
            self.owner[k].pop(p, None)
            self._hold_new(k, big)
        ref[p] += 1

    def release(self, k: int, p: int, ts: float, tie: int = 0) -> None:
        """One holder lets go of page p; at zero it becomes evictable (if cached) or free."""
        ref = self.ref[k]
        ref[p] -= 1
        if ref[p]:
            return
        big = p // self.ratio[k]
        self.nheld[k] -= 1
        self.lheld[big] -= 1
        if self.lheld[big] == 0:
            self.nzero[k] += 1
            self.lver[big] += 1
        if p in self.key[k]:
            self.ncached[k] += 1
            self.lcached[big] += 1
            self.requeue(k, p, ts, tie)
        else:
            if self.lheld[big] == 0 and self.lcached[big]:
                self._push_large(big)
            self._free_slot(k, big, p)

    def requeue(self, k: int, p: int, ts: float, tie: int) -> None:
        """Give evictable page p the eviction key (ts, tie), in both LRU heaps.

        Also the undo of a refused hit: the page gets its earlier access time back.
        """
        self.ts[k][p] = ts
        self.tie[k][p] = tie
        v = self.ver[k][p] = self.ver[k][p] + 1
        heapq.heappush(self.evict_heap[k], (ts, tie, p, v))
        big = p // self.ratio[k]
        if self.lheld[big] == 0:
            self._push_large(big)

    def _push_large(self, big: int) -> None:
        """(Re)queue a wholly evictable large page, keyed by its newest page's eviction key."""
        k = self.lkind[big]
        ts, tie = self.ts[k], self.tie[k]
        key = max((ts[q], tie[q]) for q in self._cached_in(big))
        self.lver[big] += 1
        heapq.heappush(self.large_heap, (*key, big, self.lver[big]))

    def _free_slot(self, k: int, big: int, p: int) -> None:
        self.lfree[big].append(p)
        self.nfree[k] += 1
        if self.lheld[big] == 0 and self.lcached[big] == 0:  # all free: back to the pool
            r = self.ratio[k]
            self.nfree[k] -= r
            self.nzero[k] -= 1
            self.lfree[big] = []
            self.partial[k].pop(big, None)
            self.lkind[big] = -1
            self.lowner[big] = None
            self.lver[big] += 1
            self.empty.append(big)
        else:
            self.partial[k][big] = None

    def _cached_in(self, big: int) -> list[int]:
        k = self.lkind[big]
        r = self.ratio[k]
        keys = self.key[k]
        return [q for q in range(big * r, (big + 1) * r) if q in keys and self.ref[k][q] == 0]

    # ------------------------------------------------------------------ cache keys
    def register(self, k: int, p: int, key: Hashable, group: Hashable | None = None) -> bool:
        """Make held page p findable under `key`. False if another page has the key."""
        if key in self.cache[k] or p in self.key[k]:
            return False
        self.cache[k][key] = p
        self.key[k][p] = key
        if group is not None:
            self.group[k][p] = group
            self.group_pages[k].setdefault(group, set()).add(p)
        return True

    def unregister(self, k: int, p: int) -> None:
        """Take page p out of the cache (a held page whose content was never computed)."""
        del self.cache[k][self.key[k].pop(p)]
        self.owner[k].pop(p, None)
        group = self.group[k].pop(p, None)
        if group is not None:
            members = self.group_pages[k][group]
            members.discard(p)
            if not members:
                del self.group_pages[k][group]

    # ------------------------------------------------------------------ eviction
    def _evict(self, k: int, p: int) -> None:
        """Drop evictable page p (and the rest of its group) from the cache: it becomes free."""
        group = self.group[k].get(p)
        pages = [p] if group is None else sorted(self.group_pages[k][group])
        for q in pages:
            if self.ref[k][q] or q not in self.key[k]:
                continue  # a group member still held keeps its key until released
            self.unregister(k, q)
            self.ver[k][q] += 1
            big = q // self.ratio[k]
            self.ncached[k] -= 1
            self.lcached[big] -= 1
            self.evicted_pages += 1
            self._free_slot(k, big, q)

    def _evict_lru_page(self, k: int, restricted: bool) -> int:
        heap = self.evict_heap[k]
        skipped = []
        try:
            while True:
                entry = heapq.heappop(heap)
                _, _, p, v = entry
                if v != self.ver[k][p]:
                    continue
                if self._refresh(k, p):
                    continue
                if restricted and self.lheld[p // self.ratio[k]] == 0:
                    skipped.append(entry)
                    continue
                self._evict(k, p)
                return p
        finally:
            for entry in skipped:
                heapq.heappush(heap, entry)

    def _evict_lru_large(self) -> bool:
        heap = self.large_heap
        while heap:
            _, _, big, v = heapq.heappop(heap)
            if v != self.lver[big] or self.lheld[big] or not self.lcached[big]:
                continue
            k = self.lkind[big]
            cached = self._cached_in(big)
            if any([self._refresh(k, q) for q in cached]):
                continue  # requeued with the newer time
            for q in cached:
                self._evict(k, q)
            return True
        return False

    def _refresh(self, k: int, p: int) -> bool:
        """Give evictable page p its owner's newer access time, if it has one."""
        owner = self.owner[k].get(p)
        if owner is None:
            return False
        newer = self.last_access(owner)
        if newer is None or newer <= self.ts[k][p]:
            del self.owner[k][p]
            return False
        self.requeue(k, p, newer, self.tie[k][p])
        return True

    def evict_all(self) -> int:
        """Drop every evictable page from the cache (a cache reset). Returns how many."""
        before = self.evicted_pages
        for k in range(len(self.ratio)):
            for p in [q for q in self.key[k] if self.ref[k][q] == 0]:
                if p in self.key[k]:
                    self._evict(k, p)
            self.evict_heap[k] = []
        self.large_heap = []
        return self.evicted_pages - before
