"""Paged attention for GPU: a Pallas kernel lowered through Triton.

One program per (request, KV head, row tile, split). It walks the keys its rows can
see, ``block_keys`` at a time, starting at the tile's first visible key: pages before a
sliding window or the current chunk are never touched. Keys are gathered straight from
the kind's view ``[page, layer, offset, head, head_dim]`` (K heads, then V; the page of key ``j``
is ``block_tables[b, j // tokens_per_page]``) with masked loads, so an invisible key or
a missing page is not read at all. With ``num_splits > 1`` the visible keys are cut into
that many contiguous parts run by separate programs (flash decoding) and the float32
partials are merged by :func:`pallas_kernels.rows.merge_partials`.

Decode (``q_len == 1``) and ragged prefill are the same kernel with different tiles:
decode puts the ``group`` query heads of one KV head in a tile and splits the context;
prefill tiles ``q_len * group`` rows and does not split. Triton needs power-of-2 blocks
of at least 16 rows/keys/dims; ``head_dim`` is padded to a power of 2 with masked loads,
``tokens_per_page`` can be anything.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import online_softmax, rows
from pallas_kernels.checks import check_paged_inputs, positive_int, static_float

NUM_SMS = 132  # H100 SXM; only used to pick a default number of splits


def _kernel(
    q_ref,  # [BR, Dp]
    lo_ref,  # [BR] first visible key of each row
    hi_ref,  # [BR] last visible key of each row (< lo: none)
    tile_ref,  # [B, T, 2] union range of each row tile
    bt_ref,  # [B, max_pages]
    *refs,  # (fill_ref [B, max_pages])?, view_ref, acc_ref, m_ref, l_ref
    layer: int,
    head_dim: int,
    block_keys: int,
    num_splits: int,
    scale: float,
    soft_cap: float | None,
    has_fill: bool,
):
    if has_fill:
        fill_ref, view_ref, acc_ref, m_ref, l_ref = refs
    else:
        fill_ref, (view_ref, acc_ref, m_ref, l_ref) = None, refs
    b, h, t, s = (pl.program_id(i) for i in range(4))
    num_pages, _, tpp, heads2, _ = view_ref.shape  # [P, L, tpp, 2 * Hkv, D]
    max_pages = bt_ref.shape[1]
    block_rows, head_dim_pad = q_ref.shape

    q = q_ref[...]  # [BR, Dp]
    lo, hi = lo_ref[...], hi_ref[...]  # [BR]
    t_lo, t_hi = tile_ref[b, t, 0], tile_ref[b, t, 1]
    num_blocks = pl.cdiv(jnp.maximum(t_hi - t_lo + 1, 0), block_keys)
    per_split = pl.cdiv(num_blocks, num_splits)
    first = s * per_split
    last = jnp.minimum(first + per_split, num_blocks)

    kcol = jnp.arange(block_keys, dtype=jnp.int32)  # [BK]
    dcol = jnp.arange(head_dim_pad, dtype=jnp.int32)  # [Dp]
    padded = head_dim_pad != head_dim
    d_idx = dcol[None, :]  # [1, Dp]; padded columns are masked off, never read

    def body(i, carry):
        key = t_lo + i * block_keys + kcol  # [BK] absolute key positions
        in_tile = key <= t_hi
        col = jnp.minimum(key // tpp, max_pages - 1)  # block-table column of each key
        off = key - (key // tpp) * tpp  # offset in its page
        page = bt_ref[b, col]  # [BK]
        page_ok = in_tile & (page >= 0) & (page < num_pages)
        visible = (key[None, :] >= lo[:, None]) & (key[None, :] <= hi[:, None])  # [BR, BK]
        if has_fill:
            visible &= (off < fill_ref[b, col])[None, :]
        used = jnp.max(visible.astype(jnp.int32), axis=0) > 0  # [BK] seen by some row
        load = (used & page_ok)[:, None]
        if padded:
            load = load & (dcol < head_dim)[None, :]
        load = jnp.broadcast_to(load, (block_keys, head_dim_pad))
        page_idx = jnp.where(page_ok, page, 0)[:, None]  # [BK, 1]
        off_idx = off[:, None]
        k = plgpu.load(view_ref.at[page_idx, layer, off_idx, h, d_idx], mask=load, other=0)
        v_head = heads2 // 2 + h  # V heads follow the K heads
        v = plgpu.load(view_ref.at[page_idx, layer, off_idx, v_head, d_idx], mask=load, other=0)
        logits = online_softmax.logits(q, k, scale=scale, soft_cap=soft_cap)  # [BR, BK]
        ok = visible & page_ok[None, :]
        broken = visible & ~page_ok[None, :]
        return online_softmax.update(carry, logits, ok, broken, v, keepdims=False)

    init = (
        jnp.zeros((block_rows, head_dim_pad), jnp.float32),
        jnp.full((block_rows,), -jnp.inf, jnp.float32),
        jnp.zeros((block_rows,), jnp.float32),
    )
    acc, m, den = jax.lax.fori_loop(first, last, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = den


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
        "block_keys",
        "num_splits",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def _paged_attention(
    q,  # [B, Lq, Hq, D]
    view,  # [P, L, tpp, 2 * Hkv, D]
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
    block_keys,
    num_splits,
    num_warps,
    num_stages,
    interpret,
):
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = view.shape[3] // 2
    group = q_heads // kv_heads
    head_dim_pad = max(16, pl.next_power_of_2(head_dim))
    rows_pad = rows.padded_rows(q_len, group, block_rows)
    num_tiles = rows_pad // block_rows

    q_rows = rows.fold_queries(q, kv_heads, rows_pad, head_dim_pad, view.dtype)  # [B,Hkv,R,Dp]
    pos = rows.fold_positions(q_positions, group, rows_pad)  # [B, R]
    max_keys = block_tables.shape[1] * view.shape[2]
    lo, hi = rows.key_bounds(  # [B, R]
        pos, kv_lens, kind=kind, window=window, chunk=chunk, max_keys=max_keys
    )
    tile = jnp.stack(rows.tile_key_ranges(lo, hi, block_rows), axis=-1)  # [B, T, 2]

    has_fill = page_fill is not None
    kernel = functools.partial(
        _kernel,
        layer=layer,
        head_dim=head_dim,
        block_keys=block_keys,
        num_splits=num_splits,
        scale=scale,
        soft_cap=soft_cap,
        has_fill=has_fill,
    )
    whole = pl.BlockSpec(memory_space=pl.ANY)  # the kernel indexes these itself
    row_spec = pl.BlockSpec((None, block_rows), lambda b, h, t, s: (b, t))
    in_specs = [
        pl.BlockSpec((None, None, block_rows, head_dim_pad), lambda b, h, t, s: (b, h, t, 0)),
        row_spec,
        row_spec,
        whole,
        whole,
        *([whole] if has_fill else []),
        whole,
    ]
    part = (batch, kv_heads, num_splits, rows_pad)
    out_shape = (
        jax.ShapeDtypeStruct((*part, head_dim_pad), jnp.float32),
        jax.ShapeDtypeStruct(part, jnp.float32),
        jax.ShapeDtypeStruct(part, jnp.float32),
    )
    ml_spec = pl.BlockSpec((None, None, None, block_rows), lambda b, h, t, s: (b, h, s, t))
    out_specs = (
        pl.BlockSpec(
            (None, None, None, block_rows, head_dim_pad), lambda b, h, t, s: (b, h, s, t, 0)
        ),
        ml_spec,
        ml_spec,
    )
    acc, m, den = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, kv_heads, num_tiles, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"jenga_paged_attention_{kind}",
    )(
        q_rows,
        lo,
        hi,
        tile,
        block_tables,
        *([page_fill] if has_fill else []),
        view,
    )
    out = rows.merge_partials(acc, m, den, rows.fold_sinks(sinks, kv_heads, q_len, rows_pad))
    return rows.unfold_output(out, q_len, group, head_dim, q.dtype)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Triton tiling of one call: rows and keys per program step, warps, pipeline stages."""

    block_rows: int
    block_keys: int
    num_warps: int
    num_stages: int


# (float32 K/V, padded head_dim) -> (decode (keys, warps), prefill (rows, keys, warps)).
# Measured with benchmarks/aot_compile.py (ptxas for sm_90 and sm_80, docs/performance.md):
# no register spills, shared memory within an A100's 163 KiB.
_TILES = {
    (False, 64): ((64, 4), (64, 64, 4)),
    (False, 128): ((64, 4), (64, 64, 8)),
    (False, 256): ((64, 4), (64, 16, 8)),  # prefill 64 or 32 keys spill
    (True, 64): ((32, 8), (64, 32, 8)),  # float32: FMA units, tiles in registers
    (True, 128): ((32, 8), (32, 32, 8)),  # prefill 64 rows spill 8 B on sm_80 (token-major view)
    (True, 256): ((16, 8), (16, 16, 4)),  # 32 rows or 32 keys spill
}


def default_tiles(
    q_len: int,
    group: int,
    head_dim: int,
    dtype,
    *,
    block_rows: int | None = None,
    block_keys: int | None = None,
) -> Tiles:
    """Default tiles for K/V ``dtype`` (the table above); a given rows / keys is kept.

    Decode puts the GQA group (a power of 2 >= 16) in one tile. 16-bit K/V runs its dots
    on tensor cores; float32 (exact: no TF32) on FMA units, so it takes fewer keys. Warps
    go to 8 for a tile above 64 x 64 (rows x max(keys, head_dim)).
    """
    dim = max(16, pl.next_power_of_2(head_dim))
    wide = jnp.dtype(dtype).itemsize > 2
    (decode_keys, decode_warps), prefill = _TILES[wide, min(max(dim, 64), 256)]
    rows, keys, warps = (None, decode_keys, decode_warps) if q_len == 1 else prefill
    if block_rows is None:
        block_rows = max(16, pl.next_power_of_2(group)) if q_len == 1 else rows
    if block_keys is None:
        block_keys = keys
    big = block_rows * max(block_keys, dim) > 64 * 64
    return Tiles(block_rows, block_keys, max(warps, 8 if big else 4), 2)


def default_splits(batch: int, kv_heads: int, num_tiles: int, max_keys: int, block_keys: int):
    """Enough programs to fill the GPU twice, each with at least 4 key blocks."""
    programs = batch * kv_heads * num_tiles
    if programs >= 2 * NUM_SMS:
        return 1
    return max(1, min(-(-2 * NUM_SMS // programs), max_keys // (4 * block_keys), 32))


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
    block_keys: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
):
    """Triton paged attention with the reference's signature and semantics.

    q [batch, q_len, q_heads, head_dim]; view [pages, layers, tpp, 2 * kv_heads, head_dim]
    (:func:`jenga_jax.device.reference_attention.kind_view`); block_tables int [batch,
    max_pages] (-1: no page); kv_lens int [batch]; q_positions int [batch, q_len] (-1:
    padding query, output 0). ``page_fill`` (cross only, int [batch, max_pages]): key at
    (page i, offset o) exists iff ``o < page_fill[b, i]`` (and its slot < kv_len).
    Tiles: ``block_rows`` (rows = query x head-in-group, power of 2 >= 16), ``block_keys``
    (power of 2 >= 16), ``num_warps``, ``num_stages``: defaults per dtype and head_dim from
    :func:`default_tiles`; ``num_splits`` (default: flash decoding when the grid would not
    fill the GPU).
    Returns [batch, q_len, q_heads, head_dim] in q.dtype.
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
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads, tpp = view.shape[3] // 2, view.shape[2]
    group = q_heads // kv_heads
    tiles = default_tiles(
        q_len, group, head_dim, view.dtype, block_rows=block_rows, block_keys=block_keys
    )
    block_rows = positive_int("block_rows", tiles.block_rows, power_of_2=True, minimum=16)
    block_keys = positive_int("block_keys", tiles.block_keys, power_of_2=True, minimum=16)
    if num_splits is None:
        num_tiles = rows.padded_rows(q_len, group, block_rows) // block_rows
        num_splits = default_splits(
            batch, kv_heads, num_tiles, block_tables.shape[1] * tpp, block_keys
        )
    num_splits = positive_int("num_splits", num_splits)
    num_warps = tiles.num_warps if num_warps is None else num_warps
    num_stages = tiles.num_stages if num_stages is None else num_stages
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
        block_keys=block_keys,
        num_splits=num_splits,
        num_warps=positive_int("num_warps", num_warps, power_of_2=True),
        num_stages=positive_int("num_stages", num_stages),
        interpret=bool(interpret),
    )


def paged_decode_attention(q, view, block_tables, kv_lens, q_positions, **kwargs):
    """Decode step (q_len 1): the group of each KV head in one tile, split-K over the context."""
    if jnp.ndim(q) != 4 or jnp.shape(q)[1] != 1:
        raise ValueError(
            f"decode attention needs q [batch, 1, q_heads, head_dim], got {jnp.shape(q)}"
        )
    return paged_attention(q, view, block_tables, kv_lens, q_positions, **kwargs)


def paged_prefill_attention(q, view, block_tables, kv_lens, q_positions, **kwargs):
    """Ragged prefill: each row of q is a chunk of one request, left-aligned, -1 padded.

    The request's pages must already hold the chunk's own K/V (write_kv first).
    """
    kwargs.setdefault("num_splits", 1)
    return paged_attention(q, view, block_tables, kv_lens, q_positions, **kwargs)
