"""Build a step's page table from the host manager's decisions, with numpy.

Every id is validated here, on the host, before anything reaches the device: JAX
would clip or drop an out-of-range index silently.

Rows are in text positions. A kind storing images inline (the paged plan on a model
with cross attention) keeps each request's stream [images][text]: its block tables,
slots and lengths are over the stream, shifted by the request's image tokens.
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
    the rows that write some of their images' K/V (in any cross kind, or inline).
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
    # kinds take an image's pages together, but each may have found it in the cache), or
    # rows that compute their stream from its start when images are inline.
    to_write = {
        k: [manager.cross_pages_to_write(r.request_id, k) for r in rows] for k in layout.cross_kinds
    }
    inline = any(v.inline_images for v in layout.kinds)
    offsets = [sum(manager.encoder_token_counts(r.request_id)) if inline else 0 for r in rows]
    image_rows = tuple(
        i
        for i, r in enumerate(rows)
        if any(any(w[i]) for w in to_write.values())
        or (offsets[i] and _stream_start(manager, r.request_id) == 0)
    )
    counts = [manager.encoder_token_counts(rows[i].request_id) for i in image_rows]
    enc = buckets.num_encoder(max(sum(c) for c in counts)) if image_rows else 0

    all_tables = [
        [manager.block_table(r.request_id, k) for r in rows] for k in range(len(layout.kinds))
    ]
    needed = [0 if v.is_state else max(map(len, t)) for v, t in zip(layout.kinds, all_tables)]
    widths = buckets.kind_widths(needed)  # the step's longest rows, bucketed
    entries = []
    for k, view in enumerate(layout.kinds):
        tables = all_tables[k]
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
        p = widths[k]
        bt = np.full((b, p), -1, np.int32)
        for i, t in enumerate(tables):
            ids = _ids(t)
            _check_ids(ids, view.num_pages, what)
            bt[i, : len(ids)] = ids
        if view.type is AttentionType.CROSS:
            entries.append(_cross_table(manager, rows, bt, tpp, enc, to_write[k], image_rows))
            continue
        shift = offsets if view.inline_images else [0] * len(rows)
        lengths = [len(t) for t in tables]
        spans = {
            i: (r.request_id, np.arange(r.start, r.start + r.num_tokens) + shift[i])
            for i, r in enumerate(rows)
        }
        slot_pages, slot_offsets = _slots(bt, lengths, tpp, q, spans, what)
        kv_lens = np.zeros(b, np.int32)
        kv_lens[: len(rows)] = [pos[-1] + 1 for _, pos in spans.values()]
        if not view.inline_images:
            entries.append(KindTable(bt, kv_lens, slot_pages, slot_offsets))
            continue
        key_offsets = np.zeros(b, np.int32)
        key_offsets[: len(rows)] = offsets
        spans = {i: (rows[i].request_id, np.arange(offsets[i])) for i in image_rows}
        image_pages, image_offsets = _slots(bt, lengths, tpp, enc, spans, what)
        inline = dict(
            key_offsets=key_offsets, image_slot_pages=image_pages, image_slot_offsets=image_offsets
        )
        entries.append(KindTable(bt, kv_lens, slot_pages, slot_offsets, **inline))
    return PageTable(positions, tuple(entries)), enc, image_rows


def _slots(bt, lengths, tpp: int, width: int, spans: dict, what: str):
    """Where tokens write: spans[i] = (request_id, positions) of row i, into the row's
    block table bt[i] of lengths[i] pages. Returns slot_pages, slot_offsets int32
    [len(bt), width] (-1 and 0 elsewhere)."""
    pages = np.full((len(bt), width), -1, np.int32)
    offsets = np.zeros((len(bt), width), np.int32)
    for i, (rid, pos) in spans.items():
        if pos[-1] >= lengths[i] * tpp:
            raise ValueError(f"{what}: request {rid!r} has no page for position {pos[-1]}")
        pages[i, : len(pos)] = bt[i, pos // tpp]
        offsets[i, : len(pos)] = pos % tpp
        if (pages[i, : len(pos)] < 0).any():
            raise ValueError(f"{what}: request {rid!r} writes into a released page")
    return pages, offsets


def _stream_start(manager: KVCacheManager, request_id: str) -> int:
    """Stream position this step's computation starts at (0: the request computes its
    inline images too)."""
    return manager.stream_start(request_id)


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
