"""Build a step's page table from the host manager's decisions, with numpy.

Every id is validated here, on the host, before anything reaches the device: JAX
would clip or drop an out-of-range index silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jenga_jax.core.kv_cache_manager import KVCacheManager
from jenga_jax.core.layer_kinds import AttentionType
from jenga_jax.device.page_table import KindTable, PageTable, StateTable
from jenga_jax.device.pool import PoolLayout
from jenga_jax.engine.buckets import Buckets


@dataclasses.dataclass(frozen=True)
class StepRow:
    """One request's share of a step: query tokens at positions [start, start + num_tokens)."""

    request_id: str
    start: int
    num_tokens: int


def _ids(pages: Sequence[int | None]) -> np.ndarray:
    return np.array([-1 if p is None else p for p in pages], np.int32)


def _check_ids(ids: np.ndarray, num_pages: int, what: str) -> None:
    bad = (ids < -1) | (ids >= num_pages)
    if bad.any():
        raise ValueError(f"{what}: page ids {ids[bad].tolist()} out of [0, {num_pages})")


def build_page_table(
    manager: KVCacheManager,
    layout: PoolLayout,
    rows: Sequence[StepRow],
    buckets: Buckets,
    *,
    decode: bool,
    max_seq_len: int,
) -> tuple[PageTable, int, tuple[int, ...]]:
    """numpy page table for `rows` (allocated in `manager` for this step), padded.

    Returns (table, encoder_bucket, image_rows): encoder_bucket is the padded number
    of encoder tokens written this step (0 when no row writes image K/V); image_rows
    the rows that write some of their images' K/V (in any cross kind).
    """
    if not rows:
        raise ValueError("a step needs at least one row")
    if decode and any(r.num_tokens != 1 for r in rows):
        raise ValueError("a decode step has exactly one query token per row")
    b = buckets.batch_size(len(rows))
    q = buckets.num_queries(max(r.num_tokens for r in rows), decode=decode)
    positions = np.full((b, q), -1, np.int32)
    for i, r in enumerate(rows):
        if r.num_tokens < 1 or r.start < 0:
            raise ValueError(f"row {r.request_id!r}: needs start >= 0 and num_tokens >= 1")
        end = r.start + r.num_tokens
        if end > max_seq_len:
            raise ValueError(
                f"request {r.request_id!r} reaches position {end - 1}, beyond the model's "
                f"maximum length {max_seq_len}"
            )
        positions[i, : r.num_tokens] = np.arange(r.start, end)

    # Encoder tokens written this step: rows with unfilled pages in some cross kind (the
    # kinds take an image's pages together, but each may have found it in the cache).
    to_write = {
        k: [manager.cross_pages_to_write(r.request_id, k) for r in rows] for k in layout.cross_kinds
    }
    image_rows = tuple(i for i in range(len(rows)) if any(any(w[i]) for w in to_write.values()))
    counts = [manager.encoder_token_counts(rows[i].request_id) for i in image_rows]
    enc = buckets.num_encoder(max(sum(c) for c in counts)) if image_rows else 0

    entries = []
    for k, view in enumerate(layout.kinds):
        tables = [manager.block_table(r.request_id, k) for r in rows]
        what = f"kind {k} ({view.type.value})"
        if view.is_state:
            s = view.pages_per_state
            read = np.full((b, s), -1, np.int32)
            write = np.full((b, s), -1, np.int32)
            for i, t in enumerate(tables):
                ids = _ids(t)
                _check_ids(ids, view.num_pages, what)
                read[i], write[i] = ids[:s], ids[s:]
            entries.append(StateTable(read, write))
            continue
        tpp = view.tokens_per_page
        p = buckets.num_pages(max(len(t) for t in tables))
        bt = np.full((b, p), -1, np.int32)
        for i, t in enumerate(tables):
            ids = _ids(t)
            _check_ids(ids, view.num_pages, what)
            bt[i, : len(ids)] = ids
        if view.type is AttentionType.CROSS:
            entries.append(_cross_table(manager, rows, bt, tpp, enc, to_write[k], image_rows))
            continue
        kv_lens = np.zeros(b, np.int32)
        slot_pages = np.full((b, q), -1, np.int32)
        slot_offsets = np.zeros((b, q), np.int32)
        for i, r in enumerate(rows):
            end = r.start + r.num_tokens
            kv_lens[i] = end
            pos = np.arange(r.start, end)
            if end > len(tables[i]) * tpp:
                raise ValueError(
                    f"{what}: request {r.request_id!r} has no page for position {end - 1}"
                )
            slot_pages[i, : r.num_tokens] = bt[i, pos // tpp]
            slot_offsets[i, : r.num_tokens] = pos % tpp
            if (slot_pages[i, : r.num_tokens] < 0).any():
                raise ValueError(f"{what}: request {r.request_id!r} writes into a released page")
        entries.append(KindTable(bt, kv_lens, slot_pages, slot_offsets))
    return PageTable(positions, tuple(entries)), enc, image_rows


def _cross_table(manager, rows, bt, tpp, enc, to_write, image_rows) -> KindTable:
    """Cross kind: images in order, each from a fresh page; slots for the image rows'
    pages still to write (to_write[i]: per page of row i)."""
    b, p = bt.shape
    fill = np.zeros((b, p), np.int32)
    kv_lens = np.zeros(b, np.int32)
    slot_pages = np.full((b, enc), -1, np.int32)
    slot_offsets = np.zeros((b, enc), np.int32)
    for i, r in enumerate(rows):
        page, e = 0, 0
        for n in manager.encoder_token_counts(r.request_id):
            j = np.arange(n)
            fill[i, page + j // tpp] = np.minimum(tpp, n - (j // tpp) * tpp)
            if i in image_rows:
                own = np.array(to_write[i][page : page + -(-n // tpp)])[j // tpp]
                slot_pages[i, e : e + n] = np.where(own, bt[i, page + j // tpp], -1)
                slot_offsets[i, e : e + n] = j % tpp
            page += -(-n // tpp)
            e += n
        kv_lens[i] = page * tpp
    return KindTable(bt, kv_lens, slot_pages, slot_offsets, fill)
