"""The KV cache manager: the single entry point of a scheduler into the host core.

Life of a request:
  add_request   register its prompt, images and cache keys (rejects what can never fit);
  lookup        the prefix-cache hit it would get now (pure query);
  allocate      pages for its next N tokens for every kind at once, or a refusal that
                changes nothing. The tokens of the previous allocation are taken as
                computed: their full pages enter the cache, and pages a kind will never
                read again (before a sliding window, before the current chunk) are released;
  free          finished or aborted: every page is released, full pages stay cached;
  preempt       release its pages but keep it, to be allocated again (recompute).

Positions are token positions of the request's own sequence (prompt, then generated
tokens). Images of a layout with a cross-attention kind live in that kind's pages;
otherwise they are placeholder tokens inside the prompt.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from jenga_jax.core import cache_stats
from jenga_jax.core.allocator import TwoLevelAllocator
from jenga_jax.core.block_hash import BlockHasher
from jenga_jax.core.cache_stats import CacheStats
from jenga_jax.core.errors import RequestError, RequestTooLargeError
from jenga_jax.core.layer_kinds import CHUNKED, CROSS, FULL, SLIDING, STATE
from jenga_jax.core.layout import ModelLayout
from jenga_jax.core.page_plan import PagePlan, make_plan
from jenga_jax.core.request import ImageInput
from jenga_jax.core.request_state import RequestState

PLACEHOLDER = -1  # token id standing for an encoder token stored in the token stream


@dataclasses.dataclass(frozen=True)
class AllocationResult:
    ok: bool
    num_cached_tokens: int = 0  # prefix-cache hit applied by this call (first allocation)
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


_OK = AllocationResult(True)


class KVCacheManager:
    """Allocates the pages of every kind for every request from one two-level pool."""

    def __init__(
        self,
        layout: ModelLayout,
        kv_budget_bytes: int,
        *,
        allocator: str = "jenga",
        tokens_per_page: int = 16,
        enable_prefix_caching: bool = True,
        plan: PagePlan | None = None,
        shuffle_seed: int | None = None,
    ):
        """`shuffle_seed`: hand out empty large pages in a random order (tests)."""
        self.plan = plan or make_plan(layout, allocator, tokens_per_page)
        self.layout = self.plan.layout
        num_large = int(kv_budget_bytes) // self.plan.large_page_bytes
        if num_large <= 0:
            raise RequestError(
                f"KV budget {kv_budget_bytes:,} B is smaller than one large page "
                f"({self.plan.large_page_bytes:,} B) of {self.layout.name}"
            )
        kinds = self.plan.kinds
        self.alloc = TwoLevelAllocator(
            [k.page_bytes for k in kinds],
            self.plan.large_page_bytes,
            num_large,
            shuffle_seed=shuffle_seed,
        )
        self.enable_prefix_caching = enable_prefix_caching
        self.num_kinds = len(kinds)
        self._rules = [k.rule for k in kinds]
        self._type = [k.type for k in kinds]
        self._tpp = [k.tokens_per_page for k in kinds]
        self._span = [k.tokens_per_page // self.plan.block_size for k in kinds]
        self._window = [k.rule.window or 0 for k in kinds]
        self._chunk = [k.rule.chunk or 0 for k in kinds]
        self._interval = [k.rule.checkpoint_interval or 0 for k in kinds]
        self._per_state = [k.pages_per_state for k in kinds]
        self._token_kinds = [i for i, k in enumerate(kinds) if k.is_token_kind]
        self._windowed_kinds = [i for i, k in enumerate(kinds) if k.type in (SLIDING, CHUNKED)]
        self._state_kinds = [i for i, k in enumerate(kinds) if k.type is STATE]
        self._cross_kinds = [i for i, k in enumerate(kinds) if k.type is CROSS]
        self._has_cross = self.layout.has(CROSS)
        self._balanced = self.plan.balanced_eviction
        # The planned kind that stores each layer group of the model (for needed_bytes).
        self._group_kind = [
            next(i for i, k in enumerate(kinds) if g.layer_indices[0] in k.layer_indices)
            for g in self.layout.groups
        ]
        self._clock = 0
        self._requests: dict[str, RequestState] = {}
        self._auto_id = 0
        self.hit_tokens = 0
        self.queried_tokens = 0

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str | None,
        prompt_token_ids: Sequence[int],
        *,
        images: Sequence[ImageInput] = (),
        salt: str | None = None,
        adapter: str | None = None,
        max_new_tokens: int = 0,
        prefill_chunk: int | None = None,
    ) -> str:
        """Register a waiting request. Raises if it is malformed or could never fit.

        `prefill_chunk` is the most prompt tokens the scheduler computes in one step
        (None: the whole prompt at once); it decides what "fits" means for windows.
        """
        if request_id is None:
            request_id = f"req-{self._auto_id}"
            self._auto_id += 1
        if request_id in self._requests:
            raise RequestError(f"request {request_id!r} already exists")
        tokens = list(prompt_token_ids)
        if not tokens:
            raise RequestError(f"request {request_id!r} has an empty prompt")
        for t in tokens:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise RequestError(
                    f"request {request_id!r}: token ids must be ints >= 0, got {t!r}"
                )
        if max_new_tokens < 0:
            raise RequestError(f"request {request_id!r}: max_new_tokens must be >= 0")
        images = tuple(images)
        for im in images:
            if not isinstance(im, ImageInput):
                raise RequestError(f"request {request_id!r}: images must be ImageInput, got {im!r}")
        inline, encoder, offset = images, (), 0
        if self._has_cross:
            inline, encoder = (), images
            if self.plan.images_inline:  # paged baseline: encoder tokens in every layer
                offset = sum(im.num_tokens for im in images)
                inline = tuple(
                    ImageInput(im.content_hash, im.num_tokens, start)
                    for im, start in zip(images, _cumsum([im.num_tokens for im in images]))
                )
                tokens = [PLACEHOLDER] * offset + tokens
        else:
            for im in images:
                if im.offset + im.num_tokens > len(tokens):
                    raise RequestError(
                        f"request {request_id!r}: image {im.content_hash!r} spans tokens "
                        f"[{im.offset}, {im.offset + im.num_tokens}) beyond the "
                        f"{len(tokens)}-token prompt"
                    )
        # Cross attention: every text token's K/V depends on the encoder images.
        context = [im.content_hash for im in encoder] if not self.plan.images_inline else []
        hasher = BlockHasher(self.plan.block_size, inline, adapter, salt, context)
        req = RequestState(request_id, tokens, images, encoder, hasher, offset, self.num_kinds)
        if prefill_chunk is not None and prefill_chunk <= 0:
            raise RequestError(f"request {request_id!r}: prefill_chunk must be positive")
        self._check_fits(req, len(tokens) + max_new_tokens, prefill_chunk)
        hasher.update(tokens)
        self._requests[request_id] = req
        return request_id

    def _check_fits(self, req: RequestState, total: int, chunk: int | None) -> None:
        """Raise unless the request fits an empty pool at its largest moment.

        Two moments: the prefill step (chunks of at most `chunk` prompt tokens, all
        written in one step, so a window holds the chunk as well) and the last decode
        step (`total` tokens).
        """
        prompt = len(req.tokens)
        chunk = prompt if chunk is None else min(chunk, prompt)
        large = 0
        for moment, span_extra in ((prompt, chunk), (total, 1)):
            demand = self._pages_at(req, moment, span_extra)
            large = max(large, sum(-(-d // r) for d, r in zip(demand, self.alloc.ratio)))
        if large > self.alloc.num_large:
            raise RequestTooLargeError(
                f"request {req.rid!r} needs {large} large pages ({total} tokens, prefill "
                f"chunks of {chunk}) but the pool has {self.alloc.num_large}: it can never fit"
            )

    def _pages_at(self, req: RequestState, tokens: int, step: int) -> list[int]:
        """Pages each kind holds when a step writes `step` tokens ending at `tokens`."""
        demand = [0] * self.num_kinds
        for k in range(self.num_kinds):
            t, tpp = self._type[k], self._tpp[k]
            if t is FULL:
                demand[k] = -(-tokens // tpp)
            elif t is SLIDING or t is CHUNKED:
                span = self._window[k] if t is SLIDING else self._chunk[k]
                demand[k] = min(-(-tokens // tpp), -(-(span + step) // tpp) + 1)
            elif t is CROSS:
                demand[k] = sum(-(-im.num_tokens // tpp) for im in req.encoder_images)
            else:
                demand[k] = 2 * self._per_state[k]
        return demand

    @property
    def checkpoint_interval(self) -> int | None:
        """Steps that end on a multiple of this save every state kind's checkpoint.

        A scheduler that wants prefix hits on a model with state kinds ends prefill
        chunks there. None when the layout has no state kind or one never checkpoints.
        """
        if not self._state_kinds or not all(self._interval[k] for k in self._state_kinds):
            return None
        return math.lcm(*(self._interval[k] for k in self._state_kinds))

    def _get(self, request_id: str) -> RequestState:
        req = self._requests.get(request_id)
        if req is None:
            raise RequestError(f"unknown request {request_id!r} (never added, or already freed)")
        return req

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def num_tokens(self, request_id: str) -> int:
        """Known tokens of the request (prompt + generated), placeholders excluded."""
        req = self._get(request_id)
        return len(req.tokens) - req.offset

    def token_ids(self, request_id: str, start: int = 0, end: int | None = None) -> list[int]:
        """Known token ids [start, end) of the request (prompt, then generated tokens)."""
        req = self._get(request_id)
        stop = len(req.tokens) if end is None else req.offset + end
        return req.tokens[req.offset + start : stop]

    def num_computed_tokens(self, request_id: str) -> int:
        """Tokens allocated so far: computed once the step of the last allocation ran."""
        req = self._get(request_id)
        return max(0, req.num_allocated - req.offset)

    def is_running(self, request_id: str) -> bool:
        return self._get(request_id).running

    def stream_start(self, request_id: str) -> int:
        """Stream position (inline image placeholders included) where the tokens of the
        last allocation start: 0 when that step computes the inline images too."""
        return self._get(request_id).num_computed

    def append_tokens(self, request_id: str, token_ids: Sequence[int]) -> None:
        """Append known tokens to a waiting request (a preempted one's last sampled
        token), so that `lookup` sees them; or give a running request the ids of tokens
        it allocated while they were being sampled (``allocate(..., num_unknown=)``),
        which caches the pages they fill. Running requests append new tokens through
        `allocate`."""
        req = self._get(request_id)
        unknown = req.num_allocated - len(req.tokens)
        if req.running and len(token_ids) > unknown:
            raise RequestError(
                f"request {request_id!r} is running with {max(0, unknown)} allocated tokens "
                f"of unknown id; got {len(token_ids)} ids (pass new tokens to allocate)"
            )
        for t in token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise RequestError(f"token ids must be ints >= 0, got {t!r}")
        req.tokens.extend(token_ids)
        req.hasher.update(req.tokens)
        if req.running:
            self._register_pages(req)

    def num_unknown_tokens(self, request_id: str) -> int:
        """Allocated tokens whose ids have not been given yet (see `allocate`)."""
        req = self._get(request_id)
        return max(0, req.num_allocated - len(req.tokens)) if req.running else 0

    # ------------------------------------------------------------------ lookup
    def lookup(self, request_id: str) -> int:
        """Prompt tokens a first allocation would take from the cache now."""
        req = self._get(request_id)
        if req.running:
            raise RequestError(f"request {request_id!r} is running; lookup is for waiting ones")
        return max(0, self._find_hit(req)[0] - req.offset)

    def _find_hit(self, req: RequestState):
        """(stream length L, {kind: pages to share}) of the longest hit valid for every kind."""
        if not self.enable_prefix_caching:
            return 0, {}
        gran = self.plan.hit_granularity
        limit = (len(req.tokens) - 1) // gran * gran  # never the whole sequence
        if limit <= 0:
            return 0, {}
        hashes = req.hasher.update(req.tokens)
        alloc = self.alloc
        present: dict[int, list[int | None]] = {}
        for k in self._token_kinds:  # full attention kinds bound the hit first
            if self._type[k] is not FULL:
                continue
            span, cache = self._span[k], alloc.cache[k]
            pages = []
            for p in range(limit // self._tpp[k]):
                page = cache.get(hashes[(p + 1) * span - 1])
                if page is None:
                    break
                pages.append(page)
            present[k] = pages
            limit = min(limit, len(pages) * self._tpp[k] // gran * gran)
        for k in self._token_kinds:
            if self._type[k] is FULL:
                continue
            span, cache = self._span[k], alloc.cache[k]
            present[k] = [
                cache.get(hashes[(p + 1) * span - 1]) for p in range(limit // self._tpp[k])
            ]
        prefix_missing = {
            k: _prefix_counts(v) for k, v in present.items() if self._type[k] is not FULL
        }
        for length in range(limit, 0, -gran):
            share = {}
            for k in self._token_kinds:
                tpp = self._tpp[k]
                lo = self._first_needed(k, length) // tpp
                hi = length // tpp
                if self._type[k] is not FULL:
                    # A chunk boundary reads nothing older; still ask for the page before
                    # it, so that a hit is always backed by cached pages of this prefix.
                    missing = prefix_missing[k]
                    if missing[hi] - missing[min(lo, hi - 1)]:
                        break
                share[k] = present[k][lo:hi]
            else:
                for k in self._state_kinds:
                    interval = self._interval[k]
                    if not interval or length % interval:
                        break
                    h = hashes[length // self.plan.block_size - 1]
                    pages = [alloc.cache[k].get((h, j)) for j in range(self._per_state[k])]
                    if None in pages:
                        break
                    share[k] = pages
                else:
                    return length, share
        return 0, {}

    def _first_needed(self, k: int, n: int) -> int:
        """First token kind k still reads when the next query is at position n."""
        return self._rules[k].first_needed_token(n)

    # ------------------------------------------------------------------ allocate
    def allocate(
        self,
        request_id: str,
        num_new_tokens: int,
        new_token_ids: Sequence[int] = (),
        *,
        num_unknown: int = 0,
    ) -> AllocationResult:
        """Pages for the request's next `num_new_tokens` tokens, for every kind at once.

        `new_token_ids` are appended to the request first (sampled tokens); the tokens
        to allocate must be known, except that a running request may allocate
        `num_unknown` more tokens still being sampled (asynchronous scheduling): their
        pages are taken now, cached only once `append_tokens` gives their ids, which
        must come before the request's next allocation (free and preempt forget them).
        A waiting request first takes its prefix-cache hit (reported in the result), and
        the N tokens follow the hit.
        """
        req = self._get(request_id)
        if not isinstance(num_new_tokens, int) or isinstance(num_new_tokens, bool):
            raise RequestError(f"num_new_tokens must be an int, got {num_new_tokens!r}")
        if num_new_tokens <= 0:
            raise RequestError(f"num_new_tokens must be positive, got {num_new_tokens}")
        if not isinstance(num_unknown, int) or isinstance(num_unknown, bool) or num_unknown < 0:
            raise RequestError(f"num_unknown must be an int >= 0, got {num_unknown!r}")
        if num_unknown and not req.running:
            raise RequestError(
                f"request {request_id!r} is waiting: its first allocation needs known tokens"
            )
        if req.running and req.num_allocated > len(req.tokens):
            unknown = req.num_allocated - len(req.tokens)
            raise RequestError(
                f"request {request_id!r}: give the ids of its {unknown} tokens being "
                "sampled (append_tokens) before allocating more"
            )
        for t in new_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise RequestError(f"token ids must be ints >= 0, got {t!r}")
        known = len(req.tokens) + len(new_token_ids)
        if req.running and req.num_allocated + num_new_tokens > known + num_unknown:
            raise RequestError(
                f"request {request_id!r}: allocating tokens up to "
                f"{req.num_allocated - req.offset + num_new_tokens} but only "
                f"{known - req.offset} are known; pass the new token ids"
            )
        before = len(req.tokens)
        if new_token_ids:
            req.tokens.extend(new_token_ids)
            req.hasher.update(req.tokens)
        result = None
        try:
            if req.running:
                result = self._allocate_next(req, num_new_tokens)
            else:
                result = self._allocate_first(req, num_new_tokens)
        finally:
            if not result:  # an error or a refusal changes nothing: forget the tokens
                del req.tokens[before:]
                req.hasher.truncate(before)
        return result

    def _allocate_next(self, req: RequestState, num_new_tokens: int) -> AllocationResult:
        self._commit(req)
        end = req.num_computed + num_new_tokens
        demand = self._demand(req, end)
        if demand is not None:  # else the held pages already cover the new tokens
            if not self.alloc.feasible(demand):
                return AllocationResult(False, reason=self._refusal(demand))
            self._take(req, demand)
        req.num_allocated = end
        self._register_pages(req)
        return _OK

    def _allocate_first(self, req: RequestState, num_new_tokens: int) -> AllocationResult:
        length, share = self._find_hit(req)
        if length < req.offset:  # a hit inside the encoder tokens only: recompute them
            length, share = 0, {}
        end = length + num_new_tokens + (req.offset if length == 0 else 0)
        if end > len(req.tokens):
            raise RequestError(
                f"request {req.rid!r}: {num_new_tokens} new tokens after a "
                f"{max(0, length - req.offset)}-token cache hit go beyond its "
                f"{len(req.tokens) - req.offset} known tokens (see lookup)"
            )
        alloc = self.alloc
        images = self._find_images(req)
        cross_hits = {
            k: [p for pages in found if pages for p in pages] for k, found in images.items()
        }
        shared = [
            (k, p) for part in (share, cross_hits) for k, pages in part.items() for p in pages
        ]
        demand = self._demand_first(req, length, end, share, cross_hits)
        if not alloc.feasible_after_share(demand, shared):  # refused: nothing changed
            return AllocationResult(False, reason=self._refusal(demand))
        for k, p in shared:
            alloc.share(k, p)
        # Commit: install the hit, then take the new pages.
        for k in self._token_kinds:
            tpp = self._tpp[k]
            pages = share.get(k, [])
            lo = length // tpp - len(pages)
            req.pages[k] = [None] * lo + list(pages)
            req.first[k] = lo
            req.registered[k] = length // tpp
        for k in self._state_kinds:
            if k in share:
                req.cur[k] = list(share[k])
                req.frozen[k] = True
        self._take_cross(req, images, demand)
        self._take(req, demand)
        req.running = True
        req.num_computed = length
        req.num_allocated = end
        self._register_pages(req)
        hit = max(0, length - req.offset)
        self.hit_tokens += hit
        self.queried_tokens += len(req.tokens) - req.offset
        return AllocationResult(True, num_cached_tokens=hit)

    def _find_images(self, req: RequestState) -> dict[int, list[list[int] | None]]:
        """Per cross kind, per image: its cached pages if found whole, else None."""
        found: dict[int, list[list[int] | None]] = {}
        for k in self._cross_kinds:
            found[k] = []
            for im in req.encoder_images:
                keys = [(im.content_hash, j) for j in range(-(-im.num_tokens // self._tpp[k]))]
                pages = [self.alloc.cache[k].get(key) for key in keys]
                whole = self.enable_prefix_caching and None not in pages
                found[k].append(pages if whole else None)
        return found

    def _demand_first(self, req, length, end, share, cross_hits) -> list[int]:
        demand = [0] * self.num_kinds
        for k in self._token_kinds:
            demand[k] = -(-end // self._tpp[k]) - length // self._tpp[k]
        for k in self._state_kinds:
            demand[k] = self._per_state[k]
        for k in self._cross_kinds:
            total = sum(-(-im.num_tokens // self._tpp[k]) for im in req.encoder_images)
            demand[k] = total - len(cross_hits.get(k, ()))
        return demand

    def _demand(self, req: RequestState, end: int) -> list[int] | None:
        """New pages per kind to cover tokens up to `end`; None when none are needed."""
        if end <= req.covered and not req.state_due:
            return None
        demand = None
        tpps, pages = self._tpp, req.pages
        for k in self._token_kinds:
            need = -(-end // tpps[k]) - len(pages[k])
            if need > 0:
                if demand is None:
                    demand = [0] * self.num_kinds
                demand[k] = need
        for k in self._state_kinds:
            if req.cur[k] is None or req.frozen[k]:
                if demand is None:
                    demand = [0] * self.num_kinds
                demand[k] = self._per_state[k]
        return demand

    def _take(self, req: RequestState, demand: list[int]) -> None:
        alloc = self.alloc
        for k in self._token_kinds:
            pages, owned = req.pages[k], req.owned[k]
            for _ in range(demand[k]):
                pages.append(alloc.take(k, req, owned, demand))
        for k in self._state_kinds:
            for _ in range(demand[k]):  # the pages the next step writes the state into
                req.pages[k].append(alloc.take(k, req, req.owned[k], demand))
        req.covered = min(
            (len(req.pages[k]) * self._tpp[k] for k in self._token_kinds), default=1 << 62
        )

    def _take_cross(self, req: RequestState, images, demand) -> None:
        """Cross pages per image: the cached ones found by `_find_images`, or new ones."""
        alloc = self.alloc
        for k in self._cross_kinds:
            for im, pages in zip(req.encoder_images, images[k]):
                if pages is not None:
                    req.cross_pages[k].extend(pages)
                    continue
                for j in range(-(-im.num_tokens // self._tpp[k])):
                    page = alloc.take(k, req, req.owned[k], demand)
                    req.cross_pages[k].append(page)
                    req.unwritten.add((k, page))
                    key = (im.content_hash, j)
                    if self.enable_prefix_caching and alloc.register(k, page, key, im.content_hash):
                        req.fresh.append((k, page))

    def _refusal(self, demand: list[int]) -> str:
        parts = [f"{self.plan.kinds[k].rule.name}: {d}" for k, d in enumerate(demand) if d]
        return (
            f"not enough free pages (need {', '.join(parts)}; "
            f"{self.alloc.num_empty} empty large pages)"
        )

    # ------------------------------------------------------------------ commit
    def _commit(self, req: RequestState) -> None:
        """The last allocation's tokens are computed: cache full pages, release dead ones."""
        n = req.num_allocated
        old = req.num_computed
        req.fresh = []
        req.unwritten.clear()
        if n == old:
            return
        alloc = self.alloc
        hashes = req.hasher.hashes
        caching = self.enable_prefix_caching
        self._clock += 1
        ts = self._clock
        if n >= req.next_dead:
            self._release_dead(req, n, ts)
        for k in self._state_kinds:
            written = req.pages[k]
            if written:  # the step wrote the state into new pages
                for page in req.cur[k] or ():
                    alloc.release(k, page, *self._stamp(ts, old))
                req.cur[k] = written
                req.pages[k] = []
            interval = self._interval[k]
            if caching and interval and n % interval == 0:
                h = hashes[n // self.plan.block_size - 1]
                for j, page in enumerate(req.cur[k]):
                    alloc.register(k, page, (h, j), h)
                req.frozen[k] = True
            else:
                req.frozen[k] = False
        req.state_due = any(req.frozen[k] for k in self._state_kinds)
        req.num_computed = n
        req.last_ts = ts
        if req.released:  # its adopted pages count as accessed now
            alloc.touch(req, ts)

    def _release_dead(self, req: RequestState, n: int, ts: int) -> None:
        """Release the pages sliding windows and chunks will never read again."""
        alloc = self.alloc
        for k in self._windowed_kinds:
            tpp, pages = self._tpp[k], req.pages[k]
            dead = self._first_needed(k, n) // tpp
            if dead > req.first[k]:
                for p in range(req.first[k], dead):
                    page = pages[p]
                    if page is not None:
                        pages[p] = None
                        alloc.release(k, page, *self._stamp(ts, (p + 1) * tpp))
                        if self._balanced and alloc.ref[k][page] == 0 and page in alloc.key[k]:
                            alloc.adopt(k, page, req)
                            req.released.append((k, page, (p + 1) * tpp))
                req.first[k] = dead
        req.next_dead = self._next_dead(req)

    def _next_dead(self, req: RequestState) -> int:
        """Tokens computed at which the oldest held page of some windowed kind dies."""
        soonest = 1 << 62
        for k in self._windowed_kinds:
            end = (req.first[k] + 1) * self._tpp[k]  # the oldest page's end
            if self._type[k] is SLIDING:
                at = end + self._window[k] - 1
            else:
                at = -(-end // self._chunk[k]) * self._chunk[k]
            soonest = min(soonest, at)
        return soonest

    def _register_pages(self, req: RequestState) -> None:
        """Make the request's newly full pages findable in the prefix cache.

        Done at allocation, as vLLM does: a request admitted in the same step may
        share them, because a step writes every new K/V into the pool before any
        attention reads it. (States are cached only once computed, in `_commit`.)
        """
        end = min(req.num_allocated, len(req.tokens))  # tokens being sampled: not yet
        if not self.enable_prefix_caching or end < req.next_full:
            return
        hashes, registered = req.hasher.hashes, req.registered
        for k in self._token_kinds:
            full = end // self._tpp[k]
            if registered[k] < full:
                span, pages = self._span[k], req.pages[k]
                for p in range(registered[k], full):
                    page = pages[p]
                    if page is not None and self.alloc.register(
                        k, page, hashes[(p + 1) * span - 1]
                    ):
                        req.fresh.append((k, page))
                registered[k] = full
        req.next_full = min(
            ((registered[k] + 1) * self._tpp[k] for k in self._token_kinds), default=1 << 62
        )

    def _stamp(self, ts: int, prefix_len: int) -> tuple[float, int]:
        """Eviction key of a page released now: (access time, tie-break)."""
        if self._balanced:
            return ts, -prefix_len  # aligned: among equal times the longer prefix goes first
        self._clock += 1  # one global LRU in release order
        return self._clock, 0

    # ------------------------------------------------------------------ free
    def free(self, request_id: str, *, last_step_computed: bool = True) -> None:
        """A finished or aborted request gives back every page; full pages stay cached."""
        req = self._get(request_id)
        self._release_all(req, last_step_computed)
        del self._requests[request_id]

    def preempt(self, request_id: str) -> None:
        """Release a running request's pages; it waits to be allocated again (recompute)."""
        req = self._get(request_id)
        if not req.running:
            raise RequestError(f"request {request_id!r} is not running")
        self._release_all(req, True)
        req.reset(self.num_kinds)
        req.num_computed = req.num_allocated = 0

    def _release_all(self, req: RequestState, computed: bool) -> None:
        if not req.running:
            return
        req.num_allocated = min(req.num_allocated, len(req.tokens))  # forget unknown ids
        alloc = self.alloc
        if computed:
            self._commit(req)
        else:  # the last step never ran: what it cached holds nothing valid
            for k, page in req.fresh:
                if alloc.ref[k][page] == 1:
                    alloc.unregister(k, page)
            req.fresh = []
        self._clock += 1
        ts = self._clock
        for k, page, prefix in req.released:  # balanced: they share the request's last access
            if alloc.owner[k].get(page) is req:  # requeue drops it from the request's group
                alloc.requeue(k, page, *self._stamp(ts, prefix))
        req.released = []
        for k in range(self.num_kinds):
            tpp = self._tpp[k]
            pages = req.pages[k]
            if self._type[k] is STATE:
                for page in list(pages) + list(req.cur[k] or ()):
                    alloc.release(k, page, *self._stamp(ts, req.num_computed))
                continue
            if self._type[k] is CROSS:
                pages = req.cross_pages[k]
            for p in range(len(pages) - 1, -1, -1):  # tail first
                page = pages[p]
                if page is not None:
                    alloc.release(k, page, *self._stamp(ts, (p + 1) * tpp))
        req.running = False

    def reset_cache(self) -> int:
        """Evict every cached page no running request holds. Returns how many."""
        return self.alloc.evict_all()

    # ------------------------------------------------------------------ views
    def block_table(self, request_id: str, kind: int) -> list[int | None]:
        """Page ids of one kind for the request, by page index (None: released or unused).

        Token kinds: page i holds tokens [i * tokens_per_page, (i + 1) * tokens_per_page).
        Cross kinds: the images' pages in order. State kinds: the pages_per_state pages
        holding the state the next step reads (None: the zero state), then the pages it
        writes (the same pages when the state is updated in place).
        """
        req = self._get(request_id)
        t = self._type[kind]
        if t is CROSS:
            return list(req.cross_pages[kind])
        if t is STATE:
            read = req.cur[kind] or [None] * self._per_state[kind]
            return list(read) + list(req.pages[kind] or read)
        return list(req.pages[kind])

    def cross_pages_to_write(self, request_id: str, kind: int) -> list[bool]:
        """Per page of `block_table(request_id, kind)` (a cross kind): must the next step
        write the image's K/V there? True for pages this request took new rather than
        found in the cache, until the step of its first allocation has run."""
        req = self._get(request_id)
        if self._type[kind] is not CROSS:
            raise RequestError(f"kind {kind} is {self._type[kind].value}, not cross")
        return [(kind, p) in req.unwritten for p in req.cross_pages[kind]]

    def encoder_token_counts(self, request_id: str) -> list[int]:
        """Tokens of each image stored in the cross kinds' pages (in page order)."""
        return [im.num_tokens for im in self._get(request_id).encoder_images]

    def running_ids(self) -> list[str]:
        return [rid for rid, r in self._requests.items() if r.running]

    def needed_bytes(self) -> int:
        """Bytes running requests truly need (see `cache_stats.needed_bytes`)."""
        return cache_stats.needed_bytes(self)

    def stats(self) -> CacheStats:
        return cache_stats.collect(self)


def _cumsum(values: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for v in values:
        out.append(acc)
        acc += v
    return out


def _prefix_counts(pages: Sequence[int | None]) -> list[int]:
    """counts[i] = how many of pages[:i] are missing."""
    counts = [0]
    for p in pages:
        counts.append(counts[-1] + (p is None))
    return counts
