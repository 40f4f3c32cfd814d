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

Eviction order without churn. An evictable page's key is (access time, tie-break, page).
A page a running request left behind (out of its window, balanced eviction) is
"adopted": its access time is the request's latest step, which `touch` moves forward.
Adopted pages are kept per owner, in an owner group (one heap per kind, keyed by
tie-break), and the groups in an ordered dict by their owner's latest step, so that a
step moves one group, not its pages. The LRU of kind k is then the smaller of the top
of a heap of the other pages and the top of the oldest group of that kind. Large pages
likewise: a wholly evictable large page sits in the static heap, or in the group of
the owner whose page is its newest. Every heap entry is pushed once per real change
(a release, a requeue, an adoption, a large page changing); stale entries carry an old
version and are dropped when they surface. The evictor itself pushes only for a large
page whose newest page changed owner by a step (or skipped pages, see `take`).
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict
from collections.abc import Hashable, Sequence

FREE, HELD, EVICTABLE = "free", "held", "evictable"


class _OwnerGroup:
    """The adopted evictable pages of one running request: they share its latest step."""

    __slots__ = ("owner", "ts", "pages", "count", "large", "total")

    def __init__(self, owner: object, ts: float):
        self.owner = owner
        self.ts = ts  # the owner's latest step: the access time of all these pages
        self.pages: dict[int, list[tuple]] = {}  # kind -> heap of (tie, page, version)
        self.count: dict[int, int] = {}  # kind -> adopted pages of that kind
        self.large: list[tuple] = []  # heap of (tie, large page, large version)
        self.total = 0


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
        self.evict_heap: list[list[tuple]] = [[] for _ in kinds]  # (ts, tie, page, version)
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
        self.large_heap: list[tuple] = []  # (ts, tie, large page, large version)
        self.dirty: dict[int, None] = {}  # large pages whose eviction key changed
        # Counters, per kind.
        self.nfree = [0 for _ in kinds]  # free slots inside split large pages
        self.ncached = [0 for _ in kinds]  # evictable pages
        self.nheld = [0 for _ in kinds]
        self.nzero = [0 for _ in kinds]  # split large pages with no held page
        self.evicted_pages = 0
        self.heap_pushes = 0  # every push onto an eviction heap (cost counter, for tests)
        self.evictor_pushes = 0  # of which the evictor pushed while looking for a victim
        # Balanced eviction: an evictable page released by a still-running request (out
        # of its window) counts as accessed at that request's latest step (`adopt`,
        # `touch`). `owner` maps such pages to their request, `groups` the requests
        # (by id) to their group; the ordered dicts keep the groups oldest step first.
        self.owner: list[dict[int, object]] = [{} for _ in kinds]
        self.groups: dict[int, _OwnerGroup] = {}
        self.page_owners: list[OrderedDict[int, _OwnerGroup]] = [OrderedDict() for _ in kinds]
        self.large_owners: OrderedDict[int, _OwnerGroup] = OrderedDict()

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

    def _spare_large(self, demand: Sequence[int], cached=None, zero=None) -> int:
        """Large pages left over once `demand[k]` more pages of every kind are met.

        Negative means the demands cannot be met. Exact: slots in large pages that
        hold a page are usable by their kind only; every large page without a held
        page can be emptied (by eviction) and split for any kind. `cached` and `zero`
        (per kind) stand in for `ncached` and `nzero` (see `feasible_after_share`).
        """
        cached = cached or self.ncached
        zero = zero or self.nzero
        need = 0
        pool = len(self.empty)
        for k, d in enumerate(demand):
            pool += zero[k]
            if d:
                r = self.ratio[k]
                stuck = self.nfree[k] + cached[k] - r * zero[k]
                if d > stuck:
                    need += -(-(d - stuck) // r)
        return pool - need

    def feasible(self, demand: Sequence[int]) -> bool:
        return self._spare_large(demand) >= 0

    def feasible_after_share(self, demand: Sequence[int], shared) -> bool:
        """`feasible(demand)` as it would be once every (kind, page) of `shared` (cached
        pages: a prefix hit) is shared, without sharing them: a refused admission
        changes nothing, so it leaves no requeued pages behind."""
        cached, zero = list(self.ncached), list(self.nzero)
        seen: set[tuple[int, int]] = set()
        bigs: set[int] = set()
        for k, p in shared:
            if self.ref[k][p] == 0 and (k, p) not in seen:
                seen.add((k, p))
                cached[k] -= 1
                big = p // self.ratio[k]
                if self.lheld[big] == 0 and big not in bigs:
                    bigs.add(big)
                    zero[k] -= 1
        return self._spare_large(demand, cached, zero) >= 0

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
            self._disown(k, p)
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
                self.dirty[big] = None
            self._free_slot(k, big, p)

    def requeue(self, k: int, p: int, ts: float, tie: int) -> None:
        """Give evictable page p the eviction key (ts, tie); an adopted page leaves its group."""
        self._disown(k, p)
        self.ts[k][p] = ts
        self.tie[k][p] = tie
        v = self.ver[k][p] = self.ver[k][p] + 1
        self.heap_pushes += 1
        heapq.heappush(self.evict_heap[k], (ts, tie, p, v))
        big = p // self.ratio[k]
        if self.lheld[big] == 0:
            self.dirty[big] = None

    # ------------------------------------------------------------------ adopted pages
    def adopt(self, k: int, p: int, owner: object) -> None:
        """Evictable page p, just released by the still-running `owner` at its latest step,
        counts as accessed whenever the owner steps (`touch`) until it is requeued."""
        ts = self.ts[k][p]  # the newest time so far: the group goes last
        g = self.groups.get(id(owner))
        if g is None:
            g = self.groups[id(owner)] = _OwnerGroup(owner, ts)
            self.large_owners[id(owner)] = g
        else:
            g.ts = ts
            self.large_owners.move_to_end(id(owner))
        self._disown(k, p)
        self.owner[k][p] = owner
        owners = self.page_owners[k]
        if id(owner) in owners:
            owners.move_to_end(id(owner))
            g.count[k] += 1
        else:
            owners[id(owner)] = g
            g.count[k] = 1
            g.pages[k] = []
        g.total += 1
        v = self.ver[k][p] = self.ver[k][p] + 1
        self.heap_pushes += 1
        heapq.heappush(g.pages[k], (self.tie[k][p], p, v))
        big = p // self.ratio[k]
        if self.lheld[big] == 0:
            self.dirty[big] = None

    def touch(self, owner: object, ts: float) -> None:
        """`owner` stepped at `ts` (the newest time so far): so did its adopted pages."""
        g = self.groups.get(id(owner))
        if g is None:
            return
        g.ts = ts
        self.large_owners.move_to_end(id(owner))
        for k in g.count:
            self.page_owners[k].move_to_end(id(owner))

    def _disown(self, k: int, p: int) -> None:
        owner = self.owner[k].pop(p, None)
        if owner is None:
            return
        g = self.groups[id(owner)]
        left = g.count[k] - 1
        if left:
            g.count[k] = left
        else:
            del g.count[k], g.pages[k], self.page_owners[k][id(owner)]
        g.total -= 1
        if not g.total:
            del self.groups[id(owner)], self.large_owners[id(owner)]

    def _large_key(self, big: int) -> tuple[float, int, _OwnerGroup | None]:
        """(ts, tie) of the newest evictable page of a large page, and its owner group."""
        k = self.lkind[big]
        ts, tie, owner = self.ts[k], self.tie[k], self.owner[k]
        best: tuple = ()
        group = None
        for q in self._cached_in(big):
            o = owner.get(q)
            g = None if o is None else self.groups[id(o)]
            key = (ts[q] if g is None else g.ts, tie[q])
            if key > best:
                best, group = key, g
        return best[0], best[1], group

    def _push_large(self, big: int) -> None:
        """(Re)queue a wholly evictable large page, keyed by its newest page."""
        ts, tie, group = self._large_key(big)
        v = self.lver[big] = self.lver[big] + 1
        self.heap_pushes += 1
        if group is None:
            heapq.heappush(self.large_heap, (ts, tie, big, v))
        else:
            heapq.heappush(group.large, (tie, big, v))

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
        self._disown(k, p)
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
            if self.lheld[big] == 0 and self.lcached[big]:
                self.dirty[big] = None  # its newest page may have gone

    def _evict_lru_page(self, k: int, restricted: bool) -> int:
        """Evict the LRU evictable page of kind k (restricted: in a large page with a
        held page). Candidates: the top of the static heap, the top of the oldest group."""
        heap, ver, ref, keys = self.evict_heap[k], self.ver[k], self.ref[k], self.key[k]
        owner = self.owner[k]
        skipped: list[tuple[list, tuple]] = []
        try:
            while True:
                while heap:  # drop stale entries
                    _, _, p, v = heap[0]
                    if v == ver[p] and not ref[p] and p in keys and p not in owner:
                        break
                    heapq.heappop(heap)
                top = None
                for g in self.page_owners[k].values():  # the oldest group with an entry left
                    pages = g.pages[k]
                    while pages and (pages[0][2] != ver[pages[0][1]] or pages[0][1] not in owner):
                        heapq.heappop(pages)
                    if pages:
                        top = g
                        break
                if top is not None and (not heap or (top.ts, *top.pages[k][0][:2]) < heap[0][:3]):
                    source = top.pages[k]
                    p = source[0][1]
                elif heap:
                    source = heap
                    p = heap[0][2]
                else:
                    raise RuntimeError(f"no evictable page of kind {k}")
                entry = heapq.heappop(source)
                if restricted and self.lheld[p // self.ratio[k]] == 0:
                    skipped.append((source, entry))
                    continue
                self._evict(k, p)
                return p
        finally:
            for source, entry in skipped:
                self.heap_pushes += 1
                self.evictor_pushes += 1
                heapq.heappush(source, entry)

    def _evict_lru_large(self) -> bool:
        """Evict every cached page of the LRU wholly evictable large page (False: none)."""
        for big in self.dirty:
            if self.lheld[big] == 0 and self.lcached[big]:
                self._push_large(big)
        self.dirty.clear()
        heap, lver, lheld, lcached = self.large_heap, self.lver, self.lheld, self.lcached
        while True:
            while heap and (heap[0][3] != lver[heap[0][2]] or lheld[heap[0][2]]):
                heapq.heappop(heap)
            top = None
            for g in self.large_owners.values():  # the oldest group with an entry left
                large = g.large
                while large and (large[0][2] != lver[large[0][1]] or lheld[large[0][1]]):
                    heapq.heappop(large)
                if large:
                    top = g
                    break
            if top is not None and (not heap or (top.ts, *top.large[0][:2]) < heap[0][:3]):
                tie, big, _ = heapq.heappop(top.large)
                key = (top.ts, tie)
            elif heap:
                ts, tie, big, _ = heapq.heappop(heap)
                key = (ts, tie)
            else:
                return False
            if not lcached[big]:
                continue
            ts, tie, _ = self._large_key(big)
            if (ts, tie) != key:  # another owner of one of its pages stepped since
                self.evictor_pushes += 1
                self._push_large(big)
                continue
            k = self.lkind[big]
            for q in self._cached_in(big):
                self._evict(k, q)
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
        self.dirty.clear()
        return self.evicted_pages - before
