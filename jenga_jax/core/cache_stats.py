"""Statistics of a KV cache manager: held, needed and cached bytes, waste.

held    = pool - empty large pages - evictable cached pages (free small pages inside a
          split large page count as held: they are the fragmentation);
needed  = what running requests truly read, with no page rounding (see needed_bytes);
waste   = 1 - needed / held.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from jenga_jax.core.layer_kinds import AttentionType

if TYPE_CHECKING:
    from jenga_jax.core.kv_cache_manager import KVCacheManager

CROSS, STATE = AttentionType.CROSS, AttentionType.STATE


@dataclasses.dataclass(frozen=True)
class CacheStats:
    pool_bytes: int
    held_bytes: int  # pool - empty large pages - evictable cached pages
    running_bytes: int  # pages held by running requests
    needed_bytes: int  # what running requests truly need (no page rounding)
    cached_only_bytes: int  # evictable cached pages
    empty_bytes: int
    pages_per_kind: tuple[int, ...]  # held pages
    cached_pages_per_kind: tuple[int, ...]
    num_running: int
    hit_tokens: int  # cache-hit tokens of all allocations so far
    queried_tokens: int  # prompt tokens of all first allocations so far
    evicted_pages: int

    @property
    def waste(self) -> float:
        """1 - needed / held."""
        return 1.0 - self.needed_bytes / self.held_bytes if self.held_bytes else 0.0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def needed_bytes(manager: KVCacheManager) -> int:
    """Bytes running requests truly need: the ideal, with no page rounding.

    Per layer kind of the model: the K/V of the tokens its queries still read (every
    token for full attention, the window or the current chunk otherwise), of each
    image's encoder tokens, and one state per request. What requests share through
    the prefix cache (the same physical page) counts once; two copies of the same
    content that were not shared (a cache miss) are both needed.
    """
    running = [r for r in manager._requests.values() if r.running]
    total = 0
    for g, k in zip(manager.layout.groups, manager._group_kind):
        t = g.kind.type
        if t is STATE:  # one state, two while a step reads a checkpoint and writes anew
            held = {r.cur[k][0] for r in running if r.cur[k]}  # shared checkpoints once
            held |= {r.pages[k][0] for r in running if r.pages[k]}
            total += len(held) * g.state_bytes
        elif t is CROSS and not manager.plan.images_inline:
            images = {}
            for r in running:
                pages = iter(r.cross_pages[k])
                for im in r.encoder_images:
                    first = next(pages)
                    for _ in range(-(-im.num_tokens // manager._tpp[k]) - 1):
                        next(pages)
                    images[first] = im.num_tokens
            total += sum(images.values()) * g.bytes_per_token
        else:
            if t is CROSS:  # paged: the encoder tokens lead the token stream
                ranges = [(0, r.offset) for r in running]
            else:
                ranges = [
                    (
                        r.offset + g.kind.first_needed_token(max(0, r.num_computed - r.offset)),
                        r.num_allocated,
                    )
                    for r in running
                ]
            total += live_tokens(manager, running, ranges, k) * g.bytes_per_token
    return total


def live_tokens(manager: KVCacheManager, running, ranges, k: int) -> int:
    """Distinct token slots of kind k's pages in the requests' [lo, end) ranges.

    A slot is (physical page, offset): shared pages count once, and a page counts
    from the earliest slot any of its holders still reads.
    """
    tpp = manager._tpp[k]
    ids: list[int] = []
    offsets: list[int] = []
    private = 0
    for req, (lo, end) in zip(running, ranges):
        first_page, last_page = lo // tpp, end // tpp
        private += end - max(lo, last_page * tpp)  # the partial page at the end
        if last_page > first_page:
            ids.extend(req.pages[k][first_page:last_page])
            offsets.append(lo - first_page * tpp)
            offsets.extend([0] * (last_page - first_page - 1))
    if not ids:
        return private
    ids_arr = np.asarray(ids, dtype=np.int64)
    off_arr = np.asarray(offsets, dtype=np.int64)
    order = np.lexsort((off_arr, ids_arr))  # by page, smallest offset first
    ids_arr, off_arr = ids_arr[order], off_arr[order]
    first = np.ones(len(ids_arr), dtype=bool)
    first[1:] = ids_arr[1:] != ids_arr[:-1]
    return private + int((tpp - off_arr[first]).sum())


def collect(manager: KVCacheManager) -> CacheStats:
    """The manager's statistics now (needed bytes cost O(held pages of running requests))."""
    alloc = manager.alloc
    pb = alloc.page_bytes
    pool = alloc.num_large * alloc.large_bytes
    empty = alloc.num_empty * alloc.large_bytes
    cached = sum(c * b for c, b in zip(alloc.ncached, pb))
    return CacheStats(
        pool_bytes=pool,
        held_bytes=pool - empty - cached,
        running_bytes=sum(h * b for h, b in zip(alloc.nheld, pb)),
        needed_bytes=needed_bytes(manager),
        cached_only_bytes=cached,
        empty_bytes=empty,
        pages_per_kind=tuple(alloc.nheld),
        cached_pages_per_kind=tuple(alloc.ncached),
        num_running=sum(1 for r in manager._requests.values() if r.running),
        hit_tokens=manager.hit_tokens,
        queried_tokens=manager.queried_tokens,
        evicted_pages=alloc.evicted_pages,
    )
