"""Shape buckets: pad batch, query, page and encoder dims so steps compile rarely."""

from __future__ import annotations

import dataclasses


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Sizes each padded dim may take: explicit sorted tuples, or None for powers of two.

    `min_*` are the smallest power-of-two sizes used when a dim has no explicit tuple.
    `kind_pages`: one fixed block-table width per pool kind (overrides `pages`), so that
    each kind reads only as many pages as its longest request can hold.
    """

    batch: tuple[int, ...] | None = None
    queries: tuple[int, ...] | None = None
    pages: tuple[int, ...] | None = None
    encoder: tuple[int, ...] | None = None
    kind_pages: tuple[int, ...] | None = None
    min_batch: int = 1
    min_queries: int = 8  # prefill; decode steps always use 1
    min_pages: int = 4
    min_encoder: int = 16

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

    def num_encoder(self, n: int) -> int:
        return self._pick(n, self.encoder, self.min_encoder, "encoder tokens")
