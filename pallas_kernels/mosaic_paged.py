"""Paged attention for TPU: a Pallas kernel lowered through Mosaic.

One program per (request, KV head, row tile) (rows as in :mod:`pallas_kernels.rows`).
The block tables and each tile's page range are scalar-prefetched into SMEM; the view
``[page, layer, kv, kv_head, offset, head_dim]`` stays in HBM (``memory_space=pl.ANY``)
and the program copies the pages it needs, ``pages_per_block`` at a time, into a
double-buffered VMEM block with async DMAs (block ``i + 1`` is in flight while block
``i`` is computed). Only pages in the tile's visible range are copied: pages before a
sliding window or the current chunk, past ``kv_len``, missing (-1) or (cross with
``page_fill``) empty are never read. Keys and values of one block are ``[pages_per_block
* tokens_per_page, head_dim]``, so ``tokens_per_page`` should be a multiple of 8 (16 for
bfloat16) and the row tile a multiple of 8 (16) to respect the (8, 128) VMEM tiling;
interpret mode does not need that.

No split-K here: a TPU has one or two TensorCores, which the (request, KV head, tile)
grid already fills. The kernel returns float32 partials merged (with the sinks) by
:func:`pallas_kernels.rows.merge_partials`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import online_softmax, rows
from pallas_kernels.checks import check_paged_inputs, positive_int, static_float

LANES = 128


def _each(method: str, copies) -> None:
    for c in copies:
        getattr(c, method)()


def _kernel(
    # scalar prefetch (SMEM)
    bt_ref,  # [B * max_pages] page ids
    tiles_ref,  # [B * T * 3] per row tile: first page column, end column, number of blocks
    *refs,
    layer: int,
    num_tiles: int,
    max_pages: int,
    pages_per_block: int,
    scale: float,
    soft_cap: float | None,
    has_fill: bool,
):
    if has_fill:
        fill_ref, *refs = refs  # [B * max_pages] valid tokens per page
    else:
        fill_ref = None
    (
        q_ref,  # [BR, D]
        lo_ref,  # [BR, 1] first visible key per row (sublane-major)
        hi_ref,  # [BR, 1] last visible key per row
        lo_t_ref,  # [1, BR] the same, lane-major (for the per-key "seen by a row" mask)
        hi_t_ref,  # [1, BR]
        view_hbm,  # [P, L, 2, Hkv, tpp, D] in HBM
        acc_ref,  # [BR, D] f32
        m_ref,  # [BR, 128] f32 (lane-replicated)
        l_ref,  # [BR, 128] f32
        k_buf,  # VMEM [2, ppb * tpp, D]
        v_buf,  # VMEM [2, ppb * tpp, D]
        sems,  # DMA semaphores [2 (K, V), 2 (slot)]
    ) = refs
    b, h, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_pages, _, _, _, tpp, _ = view_hbm.shape
    block_rows = q_ref.shape[0]
    ppb = pages_per_block
    block_keys = ppb * tpp

    tile = (b * num_tiles + t) * 3
    first_col, end_col, num_blocks = tiles_ref[tile], tiles_ref[tile + 1], tiles_ref[tile + 2]

    def page_of(blk, i):
        """Page of the i-th page of block blk, and how many of its tokens to read."""
        col = first_col + blk * ppb + i
        flat = b * max_pages + jnp.minimum(col, max_pages - 1)
        page = bt_ref[flat]
        live = col < end_col
        ok = live & (page >= 0) & (page < num_pages)
        tokens = fill_ref[flat] if has_fill else tpp  # keys on the page
        return page, live, ok, tokens

    def copies(blk, slot, i):
        page, live, ok, tokens = page_of(blk, i)
        page = jnp.where(ok, page, 0)
        dst = pl.ds(i * tpp, tpp)
        ck = pltpu.make_async_copy(
            view_hbm.at[page, layer, 0, h], k_buf.at[slot, dst], sems.at[0, slot]
        )
        cv = pltpu.make_async_copy(
            view_hbm.at[page, layer, 1, h], v_buf.at[slot, dst], sems.at[1, slot]
        )
        return (ck, cv), ok & (tokens > 0)

    def start(blk, slot):  # issue the DMAs of block blk into buffer slot
        for i in range(ppb):
            pair, needed = copies(blk, slot, i)
            pl.when(needed)(functools.partial(_each, "start", pair))

    def wait(blk, slot):
        for i in range(ppb):
            pair, needed = copies(blk, slot, i)
            pl.when(needed)(functools.partial(_each, "wait", pair))

    @pl.when(num_blocks > 0)
    def _():
        start(0, 0)

    q = q_ref[...]  # [BR, D]
    lo, hi = lo_ref[...], hi_ref[...]  # [BR, 1]
    lo_t, hi_t = lo_t_ref[...], hi_t_ref[...]  # [1, BR]
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, block_keys), 1)  # key index in block
    sub = jax.lax.broadcasted_iota(jnp.int32, (block_keys, 1), 0)

    def body(blk, carry):
        slot = jax.lax.rem(blk, 2)

        @pl.when(blk + 1 < num_blocks)
        def _():
            start(blk + 1, 1 - slot)

        wait(blk, slot)
        base = (first_col + blk * ppb) * tpp  # absolute position of the block's first key
        # Per key: 1 = key exists on a real page, -1 = on a missing page (a caller bug
        # if visible: NaN as in the reference), 0 = no key. Built page by page, without
        # integer division, in both orientations.
        state_l = jnp.zeros((1, block_keys), jnp.int32)
        state_s = jnp.zeros((block_keys, 1), jnp.int32)
        for i in range(ppb):
            _, live, ok, tokens = page_of(blk, i)
            code = jnp.where(ok, 1, jnp.where(live, -1, 0))
            end = i * tpp + jnp.minimum(tokens, tpp)
            state_l = jnp.where((lane >= i * tpp) & (lane < end), code, state_l)
            state_s = jnp.where((sub >= i * tpp) & (sub < end), code, state_s)
        key_l = base + lane  # [1, BK]
        key_s = base + sub  # [BK, 1]
        visible = (key_l >= lo) & (key_l <= hi)  # [BR, BK]
        seen = (key_s >= lo_t) & (key_s <= hi_t)  # [BK, BR]
        used = (jnp.max(seen.astype(jnp.float32), axis=1, keepdims=True) > 0) & (state_s > 0)
        k = k_buf[slot]  # [BK, D]
        v = jnp.where(used, v_buf[slot], 0).astype(v_buf.dtype)  # unseen rows may be NaN
        logits = online_softmax.logits(q, k, scale=scale, soft_cap=soft_cap)  # [BR, BK]
        ok = visible & (state_l > 0)
        broken = visible & (state_l < 0)
        return online_softmax.update(carry, logits, ok, broken, v, keepdims=True)

    init = (
        jnp.zeros(acc_ref.shape, jnp.float32),
        jnp.full((block_rows, 1), -jnp.inf, jnp.float32),
        jnp.zeros((block_rows, 1), jnp.float32),
    )
    acc, m, den = jax.lax.fori_loop(0, num_blocks, body, init)
    acc_ref[...] = acc
    m_ref[...] = jnp.broadcast_to(m, m_ref.shape)
    l_ref[...] = jnp.broadcast_to(den, l_ref.shape)


@functools.partial(
    jax.jit,
    static_argnames=(
        "layer",
        "kind",
        "window",
        "chunk",
        "scale",
        "soft_cap",
        "block_rows",
        "pages_per_block",
        "interpret",
    ),
)
def _paged_attention(
    q,  # [B, Lq, Hq, D]
    view,  # [P, L, 2, Hkv, tpp, D]
    block_tables,  # [B, max_pages]
    kv_lens,  # [B]
    q_positions,  # [B, Lq]
    sinks,  # [Hq] or None
    page_fill,  # [B, max_pages] or None
    *,
    layer,
    kind,
    window,
    chunk,
    scale,
    soft_cap,
    block_rows,
    pages_per_block,
    interpret,
):
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads, tpp = view.shape[3], view.shape[4]
    group = q_heads // kv_heads
    rows_pad = rows.padded_rows(q_len, group, block_rows)
    num_tiles = rows_pad // block_rows

    q_rows = rows.fold_queries(q, kv_heads, rows_pad, head_dim, view.dtype)  # [B, Hkv, R, D]
    pos = rows.fold_positions(q_positions, group, rows_pad)  # [B, R]
    max_keys = block_tables.shape[1] * view.shape[4]
    lo, hi = rows.key_bounds(  # [B, R]
        pos, kv_lens, kind=kind, window=window, chunk=chunk, max_keys=max_keys
    )
    lo_tile, hi_tile = rows.tile_key_ranges(lo, hi, block_rows)  # [B, T]
    first = lo_tile // tpp
    end = jnp.where(hi_tile >= lo_tile, hi_tile // tpp + 1, first)
    blocks = -(-(end - first) // pages_per_block)
    tiles = jnp.stack([first, end, blocks], axis=-1).reshape(-1)  # [B * T * 3]
    lo_s, hi_s = lo.reshape(batch, rows_pad, 1), hi.reshape(batch, rows_pad, 1)
    lo_l = lo.reshape(batch * num_tiles, 1, block_rows)
    hi_l = hi.reshape(batch * num_tiles, 1, block_rows)

    has_fill = page_fill is not None
    prefetch = [block_tables.reshape(-1), tiles] + ([page_fill.reshape(-1)] if has_fill else [])
    kernel = functools.partial(
        _kernel,
        layer=layer,
        num_tiles=num_tiles,
        max_pages=block_tables.shape[1],
        pages_per_block=pages_per_block,
        scale=scale,
        soft_cap=soft_cap,
        has_fill=has_fill,
    )
    row_s = pl.BlockSpec((None, block_rows, 1), lambda b, h, t, *_: (b, t, 0))
    row_l = pl.BlockSpec((None, 1, block_rows), lambda b, h, t, *_: (b * num_tiles + t, 0, 0))
    tile_spec = pl.BlockSpec((None, None, block_rows, head_dim), lambda b, h, t, *_: (b, h, t, 0))
    ml_spec = pl.BlockSpec((None, None, block_rows, LANES), lambda b, h, t, *_: (b, h, t, 0))
    block_keys = pages_per_block * tpp
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch),
        grid=(batch, kv_heads, num_tiles),
        in_specs=[tile_spec, row_s, row_s, row_l, row_l, pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[tile_spec, ml_spec, ml_spec],
        scratch_shapes=[
            pltpu.VMEM((2, block_keys, head_dim), view.dtype),
            pltpu.VMEM((2, block_keys, head_dim), view.dtype),
            pltpu.SemaphoreType.DMA((2, 2)),
        ],
    )
    acc, m, den = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, rows_pad, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, rows_pad, LANES), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, rows_pad, LANES), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")
        ),
        interpret=interpret,
        name=f"jenga_paged_attention_{kind}",
    )(*prefetch, q_rows, lo_s, hi_s, lo_l, hi_l, view)
    out = rows.merge_partials(
        acc[:, :, None],
        m[:, :, None, :, 0],
        den[:, :, None, :, 0],
        rows.fold_sinks(sinks, kv_heads, q_len, rows_pad),
    )
    return rows.unfold_output(out, q_len, group, head_dim, q.dtype)


def paged_attention(
    q,
    view,
    block_tables,
    kv_lens,
    q_positions,
    *,
    layer: int,
    kind: str,
    window: int | None = None,
    chunk: int | None = None,
    scale: float,
    soft_cap: float | None = None,
    sinks=None,
    page_fill=None,
    block_rows: int | None = None,
    pages_per_block: int | None = None,
    interpret=False,
):
    """Mosaic (TPU) paged attention with the reference's signature and semantics.

    Arguments as :func:`pallas_kernels.triton_paged.paged_attention`. ``block_rows``
    (multiple of 8; default: the group rounded up to 8 (16 for bf16 K/V) for decode, 128
    for prefill) and ``pages_per_block`` (default: 256 keys' worth). ``interpret``:
    False, True, or a ``pltpu.InterpretParams`` (TPU interpret mode on CPU, which also
    checks DMAs and semaphores).
    """
    q, block_tables, kv_lens, q_positions, sinks, page_fill = check_paged_inputs(
        q,
        view,
        block_tables,
        kv_lens,
        q_positions,
        layer=layer,
        kind=kind,
        window=window,
        chunk=chunk,
        scale=scale,
        soft_cap=soft_cap,
        sinks=sinks,
        page_fill=page_fill,
    )
    _, q_len, q_heads, _ = q.shape
    kv_heads, tpp = view.shape[3], view.shape[4]
    group = q_heads // kv_heads
    sublanes = 8 * (4 // jnp.dtype(view.dtype).itemsize)
    if block_rows is None:
        block_rows = -(-group // sublanes) * sublanes if q_len == 1 else 128
    block_rows = positive_int("block_rows", block_rows, minimum=8)
    if block_rows % 8:
        raise ValueError(f"block_rows must be a multiple of 8 (TPU sublanes), got {block_rows}")
    if pages_per_block is None:
        pages_per_block = max(1, min(256 // tpp, block_tables.shape[1]))
    pages_per_block = positive_int("pages_per_block", pages_per_block)
    if interpret is True:
        interpret = pltpu.InterpretParams()
    return _paged_attention(
        q,
        view,
        block_tables,
        kv_lens,
        q_positions,
        sinks,
        page_fill,
        layer=int(layer),
        kind=kind,
        window=window,
        chunk=chunk,
        scale=static_float("scale", scale),
        soft_cap=static_float("soft_cap", soft_cap),
        block_rows=block_rows,
        pages_per_block=pages_per_block,
        interpret=interpret or False,
    )


def paged_decode_attention(q, view, block_tables, kv_lens, q_positions, **kwargs):
    """Decode step (q_len 1): one tile holds the query heads of one KV head."""
    if jnp.ndim(q) != 4 or jnp.shape(q)[1] != 1:
        raise ValueError(
            f"decode attention needs q [batch, 1, q_heads, head_dim], got {jnp.shape(q)}"
        )
    return paged_attention(q, view, block_tables, kv_lens, q_positions, **kwargs)


def paged_prefill_attention(q, view, block_tables, kv_lens, q_positions, **kwargs):
    """Ragged prefill: each row of q is a chunk of one request, left-aligned, -1 padded.

    The request's pages must already hold the chunk's own K/V (write_kv first).
    """
    return paged_attention(q, view, block_tables, kv_lens, q_positions, **kwargs)
