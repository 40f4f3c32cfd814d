"""The page-table state of one step: a frozen pytree passed to the jitted steps.

Built on the host with numpy (``jenga_jax.engine.page_table_builder``), padded to shape
buckets, moved to the device once per step. Padding rows and tokens use -1 everywhere.

Per token kind (full, sliding, chunked) a :class:`KindTable`:
  block_tables int32 [B, P]   page of tokens [i * tpp, (i + 1) * tpp); -1: none
  kv_lens      int32 [B]      tokens with K/V after this step's writes
  slot_pages   int32 [B, Q]   where this step's token q writes its K/V (-1: padding)
  slot_offsets int32 [B, Q]
Per cross kind a :class:`KindTable` over the encoder (image) tokens, plus
  page_fill    int32 [B, P]   valid tokens of each page (each image starts a page)
  slot_*       int32 [B, E]   where encoder token e writes (-1: cached or not this step)
The paged plan's token kind on a model with cross attention stores each request's
images ahead of its text (its stream: stream position = text position + offset), plus
  key_offsets        int32 [B]     image tokens ahead of the text (the offset)
  image_slot_pages   int32 [B, E]  where image token e writes (-1: not this step)
  image_slot_offsets int32 [B, E]
and its block tables, kv_lens and slots are over the stream.
Per state kind a :class:`StateTable`:
  read_pages   int32 [B, S]   pages of the state to read (-1: zero state), S pages/state
  write_pages  int32 [B, S]   pages to write the new state into (may equal read_pages)
and q_positions int32 [B, Q] (absolute positions; -1: padding) shared by all kinds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental import checkify

from jenga_jax.core.layer_kinds import AttentionType
from jenga_jax.device.pool import PoolLayout


@struct.dataclass
class KindTable:
    block_tables: jax.Array
    kv_lens: jax.Array
    slot_pages: jax.Array
    slot_offsets: jax.Array
    page_fill: jax.Array | None = None  # cross kinds only
    key_offsets: jax.Array | None = None  # inline-image kinds only (the paged plan)
    image_slot_pages: jax.Array | None = None  # inline-image kinds only
    image_slot_offsets: jax.Array | None = None  # inline-image kinds only

    @property
    def encoder_slots(self) -> int:
        """E, the padded encoder tokens this step's slots cover (cross or inline kinds)."""
        pages = self.slot_pages if self.image_slot_pages is None else self.image_slot_pages
        return pages.shape[1]


@struct.dataclass
class StateTable:
    read_pages: jax.Array
    write_pages: jax.Array


@struct.dataclass
class PageTable:
    q_positions: jax.Array
    kinds: tuple[KindTable | StateTable, ...]

    @property
    def batch(self) -> int:
        return self.q_positions.shape[0]

    @property
    def num_real_queries(self) -> jax.Array:
        """int32 [B]: real (left-aligned) query tokens of each row."""
        return jnp.sum(self.q_positions >= 0, axis=1).astype(jnp.int32)


def check_matches(table: PageTable, layout: PoolLayout) -> None:
    """Raise unless the table has one entry of the right kind and shape per pool kind.

    Static (shapes only): runs at trace time, so a table built for another model fails
    before anything is written.
    """
    if len(table.kinds) != len(layout.kinds):
        raise ValueError(
            f"page table has {len(table.kinds)} kinds, the model's pool has "
            f"{len(layout.kinds)}: {[k.type.value for k in layout.kinds]}"
        )
    b, q = table.q_positions.shape
    for k, (entry, view) in enumerate(zip(table.kinds, layout.kinds)):
        want = StateTable if view.is_state else KindTable
        if not isinstance(entry, want):
            raise ValueError(
                f"page table kind {k} is a {type(entry).__name__}, but the model's kind {k} "
                f"is {view.type.value} (needs a {want.__name__})"
            )
        if view.is_state:
            shapes = {
                "read_pages": (b, view.pages_per_state),
                "write_pages": (b, view.pages_per_state),
            }
        else:
            p = entry.block_tables.shape[-1]
            shapes = {"block_tables": (b, p), "kv_lens": (b,)}
            if view.type is not AttentionType.CROSS:
                shapes |= {"slot_pages": (b, q), "slot_offsets": (b, q)}
            if (entry.page_fill is not None) != (view.type is AttentionType.CROSS):
                raise ValueError(f"page table kind {k}: page_fill is for cross kinds only")
            inline = ("key_offsets", "image_slot_pages", "image_slot_offsets")
            if any((getattr(entry, n) is not None) != view.inline_images for n in inline):
                raise ValueError(
                    f"page table kind {k}: {', '.join(inline)} go with a kind storing "
                    "images inline, and only with one"
                )
            if view.inline_images:
                e = entry.image_slot_pages.shape[-1]
                shapes |= {"key_offsets": (b,), "image_slot_pages": (b, e)}
                shapes |= {"image_slot_offsets": (b, e)}
        for name, shape in shapes.items():
            got = getattr(entry, name).shape
            if got != shape:
                raise ValueError(
                    f"page table kind {k} ({view.type.value}): {name} {got} != {shape}"
                )


def device_checks(table: PageTable, layout: PoolLayout) -> None:
    """checkify checks that every page id is -1 or in range (debug mode).

    JAX clips (gathers) or drops (scatters) out-of-range indices silently; under
    ``checkify.checkify`` these raise instead. The host builder validates the same.
    """
    for k, (entry, view) in enumerate(zip(table.kinds, layout.kinds)):
        n = view.num_pages
        ids = (
            (entry.read_pages, entry.write_pages)
            if view.is_state
            else (entry.block_tables, entry.slot_pages)
        )
        slots = [] if view.is_state else [(entry.slot_pages, entry.slot_offsets)]
        if view.inline_images:
            ids += (entry.image_slot_pages,)
            slots.append((entry.image_slot_pages, entry.image_slot_offsets))
            offsets_ok = jnp.all((entry.key_offsets >= 0) & (entry.key_offsets <= entry.kv_lens))
            checkify.check(offsets_ok, f"kind {k} ({view.type.value}): key offset out of range")
        for arr in ids:
            ok = jnp.all((arr >= -1) & (arr < n))
            checkify.check(ok, f"kind {k} ({view.type.value}): page id out of [-1, {n})")
        if not view.is_state:
            tpp = view.tokens_per_page
            for pages, offsets in slots:
                offsets_ok = jnp.all((pages < 0) | ((offsets >= 0) & (offsets < tpp)))
                checkify.check(
                    offsets_ok, f"kind {k} ({view.type.value}): slot offset out of range"
                )
            lens_ok = jnp.all(
                (entry.kv_lens >= 0) & (entry.kv_lens <= entry.block_tables.shape[1] * tpp)
            )
            checkify.check(lens_ok, f"kind {k} ({view.type.value}): kv_len beyond the table")
