"""Shape buckets: pad batch, query, page and encoder dims so steps compile rarely."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Sizes each padded dim may take: explicit sorted tuples, or None for powers of two.

    `min_*` are the smallest power-of-two sizes used when a dim has no explicit tuple.
    `kind_pages`: the widest block table of each pool kind (overrides `pages`): what its
    longest request can hold. `kind_levels`: the block-table widths a step may use, as
    whole per-kind tuples in ascending order (the last one `kind_pages`): a step takes
    the first level that holds every kind's longest row, so that attention reads about
    the pages in use, and the kinds' widths move together (a few step shapes, not a
    product over kinds). None: every step uses `kind_pages`.
    """

    batch: tuple[int, ...] | None = None
    queries: tuple[int, ...] | None = None
    pages: tuple[int, ...] | None = None
    encoder: tuple[int, ...] | None = None
    kind_pages: tuple[int, ...] | None = None
    kind_levels: tuple[tuple[int, ...], ...] | None = None
    min_batch: int = 1
    min_queries: int = 8  # prefill; decode steps always use 1
    min_pages: int = 4
    min_encoder: int = 16

    def __post_init__(self):
        levels = self.kind_levels
        if levels is None:
            return
        if self.kind_pages is None or not levels or tuple(levels[-1]) != self.kind_pages:
            raise ValueError(
                f"kind_levels must end with kind_pages {self.kind_pages}, got {levels}"
            )
        for lo, hi in zip(levels, levels[1:]):
            if len(lo) != len(hi) or any(a > b for a, b in zip(lo, hi)) or lo == hi:
                raise ValueError(f"kind_levels must grow level by level, got {levels}")

    def _pick(self, n: int, sizes: tuple[int, ...] | None, minimum: int, what: str) -> int:
        if sizes is None:
            return max(minimum, _next_pow2(n))
        for s in sizes:
            if s >= n:
                return s
        raise ValueError(f"{what} of {n} exceeds the largest bucket {sizes[-1]} ({sizes})")

    def batch_size(self, n: int) -> int:
        return self._pick(n, self.batch, self.min_batch, "batch")

    def num_queries(self, n: int, *, decode: bool) -> int:
        return 1 if decode else self._pick(n, self.queries, self.min_queries, "query chunk")

    def num_pages(self, n: int, kind: int | None = None) -> int:
        if self.kind_pages is not None and kind is not None:
            width = (self.kind_pages[kind],)
            return self._pick(n, width, self.min_pages, f"kind {kind} block table")
        return self._pick(n, self.pages, self.min_pages, "block table")

    def kind_widths(self, needed: Sequence[int]) -> tuple[int, ...]:
        """Block-table width of every kind for a step whose longest row of kind k holds
        needed[k] pages: the first level that fits them all (see `kind_levels`), else
        each kind on its own (`num_pages`)."""
        if self.kind_levels is None:
            return tuple(self.num_pages(n, kind=k) for k, n in enumerate(needed))
        for level in self.kind_levels:
            if all(n <= w for n, w in zip(needed, level)):
                return tuple(level)
        raise ValueError(
            f"block tables of {list(needed)} pages exceed the widest level {self.kind_pages}"
        )

    def num_encoder(self, n: int) -> int:
        return self._pick(n, self.encoder, self.min_encoder, "encoder tokens")


def width_levels(
    kind_pages: Sequence[int], tokens_per_page: Sequence[int | None], num_levels: int
) -> tuple[tuple[int, ...], ...]:
    """Up to `num_levels` block-table levels for `Buckets.kind_levels`, widest last.

    Level i covers a token stream of L_i = L / 2**i tokens, L the longest stream of any
    kind (kind_pages[k] * tokens_per_page[k]): kind k gets ceil(L_i / tpp_k) pages, at
    most kind_pages[k]. Kinds without a token stream (tokens_per_page None: state and
    cross kinds) keep kind_pages at every level. Halving stops before a level would hold
    less than one page of the largest token page; equal levels are merged.
    """
    if not isinstance(num_levels, int) or isinstance(num_levels, bool) or num_levels < 1:
        raise ValueError(
            f"the number of block-table levels must be an int >= 1, got {num_levels!r}"
        )
    token = [(w, t) for w, t in zip(kind_pages, tokens_per_page) if t]
    if not token:
        return (tuple(kind_pages),)
    longest = max(w * t for w, t in token)
    floor = max(t for _, t in token)
    levels: list[tuple[int, ...]] = []
    for i in range(num_levels):
        span = -(-longest // 2**i)
        if i and span < floor:
            break
        level = tuple(
            min(w, -(-span // t)) if t else w for w, t in zip(kind_pages, tokens_per_page)
        )
        if level not in levels:
            levels.append(level)
    return tuple(reversed(levels))
