"""What a layer reads and writes besides its weights: paged (the pool) or dense (none).

Layers call ``cache.attend``, ``cache.cross_attend`` or ``cache.mamba`` and get back
``(new_cache, out)``. :class:`PagedCache` writes the step's K/V (or state) into the
shared pool through the page table, then reads it back; :class:`DenseCache` is the
no-cache oracle over a whole sequence. The models are the same code over both.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jenga_jax.device import mamba, reference_attention
from jenga_jax.device.page_table import KindTable, PageTable, StateTable
from jenga_jax.device.pool import PoolLayout
from jenga_jax.device.reference_attention import dense_attention, write_kv
from pallas_kernels import choose_backend, paged_attention, parse_backend


@dataclasses.dataclass(frozen=True)
class DenseCache:
    """No cache: every layer sees the whole sequence at once (the oracle).

    positions int [B, T]; image_embeds [B, E, vision_dim] or None; image_lens int [B].
    """

    positions: jax.Array
    image_embeds: jax.Array | None = None
    image_lens: jax.Array | None = None

    def attend(self, layer, q, k, v, *, kind, window, chunk, scale, soft_cap, sinks):
        out = dense_attention(
            q, k, v, self.positions, self.positions, kind=kind, window=window, chunk=chunk,
            scale=scale, soft_cap=soft_cap, sinks=sinks,
        )  # fmt: skip
        return self, out

    def cross_attend(self, layer, q, project, *, scale):
        """q [B, T, H, D]; project(images [B, E, vd]) -> k, v [B, E, Hkv, D].

        Returns (cache, out [B, T, H, D], has_image bool [B])."""
        b, e = self.image_embeds.shape[:2]
        k, v = project(self.image_embeds)
        k_pos = jnp.where(jnp.arange(e)[None] < self.image_lens[:, None], jnp.arange(e)[None], -1)
        out = dense_attention(q, k, v, self.positions, k_pos, kind="cross", scale=scale)
        return self, out, self.image_lens > 0

    def mamba(self, layer, params, x):
        """x [B, T, d_model] from the zero state. Returns (cache, y [B, T, d_model])."""
        conv, ssm = mamba.zero_state(params)
        b = x.shape[0]
        conv = jnp.broadcast_to(conv, (b, *conv.shape))
        ssm = jnp.broadcast_to(ssm, (b, *ssm.shape))
        y, _, _ = mamba.mamba_forward_batch(params, x, conv, ssm)
        return self, y


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedCache:
    """The shared pool, threaded through the layers of one step.

    pool [rows, lane]; table: the step's page table; layout
    (static): the pool's views and where each model layer lives; image_embeds
    [B, E, vision_dim] or None (only on steps that write cross K/V); backend (static):
    the paged-attention kernel (None: by platform, see ``pallas_kernels.dispatch``; a
    "-interpret" suffix runs a kernel in interpret mode).
    """

    pool: jax.Array
    table: PageTable
    image_embeds: jax.Array | None
    layout: PoolLayout = dataclasses.field(metadata=dict(static=True))
    backend: str | None = dataclasses.field(default=None, metadata=dict(static=True))

    def _kernel(self) -> dict:
        """Keyword arguments choosing the attention kernel: "triton-interpret" and
        "mosaic-interpret" run a kernel in interpret mode (CPU tests)."""
        name, interpret = parse_backend(self.backend)
        return dict(backend=name, **({"interpret": True} if interpret else {}))

    def _write(self, view, slot: int, pages, offsets, k, v, *, after=None):
        """Scatter k, v [B, T, Hkv, D] into layer `slot` of a kind's view at the slots
        pages, offsets [B, T]; returns the new view."""
        b, t = k.shape[:2]
        return write_kv(
            view,
            k.reshape(b * t, *k.shape[2:]),
            v.reshape(b * t, *v.shape[2:]),
            pages.reshape(-1),
            offsets.reshape(-1),
            layer=slot,
            after=after,
        )

    def _attention(self, key_offsets=None):
        """The attention function, its backend bound. Only the pure-JAX reference takes
        key offsets (images inline in the stream: the paged plan)."""
        if key_offsets is None:
            return functools.partial(paged_attention, **self._kernel())
        name = choose_backend(parse_backend(self.backend)[0])[0]
        if name != "reference":
            raise ValueError(
                f"the {name} kernel cannot attend over a token stream with images inline "
                "(the paged plan on a model with cross attention): use the reference backend"
            )
        return functools.partial(reference_attention.paged_attention, key_offsets=key_offsets)

    def _slot(self, layer):
        s = self.layout.layer_slots[layer]
        return s, self.layout.kinds[s.kind], self.table.kinds[s.kind]

    def _with_pool(self, view):
        return dataclasses.replace(self, pool=self.layout.unview(view, self.pool.dtype))

    def attend(self, layer, q, k, v, *, kind, window, chunk, scale, soft_cap, sinks):
        """Write this step's k, v [B, Q, Hkv, D], then attend q [B, Q, H, D] over the pages.

        A layer of a mixed kind (paged plan) applies its own kind's mask over every token;
        with images inline, its keys start after them (key_offsets)."""
        s, kv, entry = self._slot(layer)
        assert isinstance(entry, KindTable) and (kv.mixed or kv.type.value == kind), (kind, kv)
        view = self.layout.view(self.pool, s.kind)
        view = self._write(view, s.slot, entry.slot_pages, entry.slot_offsets, k, v)
        out = self._attention(entry.key_offsets)(
            q, view, entry.block_tables, entry.kv_lens, self.table.q_positions, layer=s.slot,
            kind=kind, window=window, chunk=chunk, scale=scale, soft_cap=soft_cap, sinks=sinks,
        )  # fmt: skip
        return self._with_pool(view), out

    def cross_attend(self, layer, q, project, *, scale):
        """Write the encoder K/V of rows that need it (image_embeds given), then attend.

        Images inline (paged plan): the images are the first key_offsets slots of the
        layer's token stream, written at the image slots."""
        s, kv, entry = self._slot(layer)
        view = self.layout.view(self.pool, s.kind)
        inline = kv.inline_images
        if self.image_embeds is not None:
            k, v = project(self.image_embeds)  # [B, E, Hkv, D]
            pages, offsets = entry.slot_pages, entry.slot_offsets
            if inline:
                pages, offsets = entry.image_slot_pages, entry.image_slot_offsets
            # Image K/V do not depend on the earlier layers: order the write after them.
            view = self._write(view, s.slot, pages, offsets, k, v, after=q)
        kv_lens = entry.key_offsets if inline else entry.kv_lens  # [B] image keys
        out = paged_attention(
            q, view, entry.block_tables, kv_lens, self.table.q_positions, layer=s.slot,
            kind="cross", scale=scale, page_fill=entry.page_fill, **self._kernel(),
        )  # fmt: skip
        return self._with_pool(view), out, kv_lens > 0

    def mamba(self, layer, params, x):
        """Read the state pages, run the step's tokens x [B, Q, d_model], write the state."""
        s, kv, entry = self._slot(layer)
        assert isinstance(entry, StateTable)
        d_inner, d_state, d_conv = kv.state_dims
        dims = dict(d_inner=d_inner, d_state=d_state, d_conv=d_conv)
        view = self.layout.view(self.pool, s.kind)
        conv, ssm = mamba.read_state(view, entry.read_pages[:, s.part], s.slot, **dims)
        y, conv, ssm = mamba.mamba_forward_batch(
            params, x, conv, ssm, valid_lens=self.table.num_real_queries
        )
        write = entry.write_pages[:, s.part]
        view = mamba.write_state(view, write, s.slot, conv, ssm, after=y)
        return self._with_pool(view), y
