"""Paged attention for TPU: a Pallas kernel lowered through Mosaic.

The view ``[page, layer, offset, 2 * kv_heads, head_dim]`` (token-major, K heads then V
heads on the second-minor axis) is passed to the kernel as the 2-D array ``[rows,
head_dim]`` it is a reshape of (the pool itself), and stays in HBM
(``memory_space=pl.ANY``). A page of one layer is ``tokens_per_page * 2 * kv_heads``
consecutive rows.

One program per (request, row tile) (rows as in :mod:`pallas_kernels.rows`), for every
KV head: it copies whole pages (all heads, K and V: one contiguous, tile-aligned DMA
per page), ``pages_per_block`` at a time, into a double-buffered VMEM block (block
``i + 1`` in flight while block ``i`` is computed), then loops over the KV heads,
loading one head's K and V rows with strided loads (stride ``2 * kv_heads`` rows;
2-byte dtypes are loaded as 32-bit words holding two heads and unpacked). Each page is
read from HBM once per row tile, whatever the number of heads. Only pages in the tile's
visible range are copied: pages before a sliding window or the current chunk, past
``kv_len``, missing (-1) or (cross with ``page_fill``) empty are never read.

The request's row of the block table (and of ``page_fill``) is a per-request SMEM block
(pipelined by Pallas: fetched when the request changes), so SMEM holds ``max_pages``
entries, not ``batch * max_pages``. The tiles' page ranges are scalar-prefetched.

No split-K: a TPU has one or two TensorCores, which the (request, tile) grid fills, so
the program merges its own result with the sinks and writes the attention output.
``tokens_per_page * 2 * kv_heads`` should be a multiple of 8 (16 for 2-byte dtypes) and
the row tile a multiple of 8 (16), to respect the VMEM tiling; interpret mode does not
need that.
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
BLOCK_KEYS = 256  # default keys per DMA block
BLOCK_BYTES = 2 * 2**20  # default cap on one DMA block (one of the two buffers)
PREFILL_ROWS = 128  # default row tile of a prefill
TILE_ROWS = 1024  # default cap on kv_heads * row tile (the q, output and accumulator tiles)


def _each(method: str, copies) -> None:
    for c in copies:
        getattr(c, method)()


def _sublanes(dtype) -> int:
    """Rows per VMEM tile: 8 for 4-byte dtypes, 16 for 2-byte ones."""
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def _interpreting(interpret) -> bool:
    """Whether the kernel runs in TPU interpret mode (argument or the context manager)."""
    forced = getattr(jax.config, "pallas_tpu_interpret_mode_context_manager", None)
    return bool(interpret) or getattr(forced, "value", None) is not None


def unpack_half(words, high: bool, dtype):
    """uint32 words holding two 16-bit floats -> the low or high ones, as `dtype`.

    A 16-bit float (bfloat16) is the high half of the 32-bit float of the same value.
    """
    bits = words & jnp.uint32(0xFFFF0000) if high else words << 16
    return pltpu.bitcast(bits, jnp.float32).astype(dtype)


def head_group(kv_heads: int, dtype, packed: bool) -> int:
    """KV heads one step of the kernel's head loop handles: 1, or 2 for packed 2-byte
    K/V (one 32-bit word row holds two heads), or all of them (odd ``kv_heads``, packed:
    head pairs straddle K and V, so the loop is unrolled)."""
    if jnp.dtype(dtype).itemsize == 4 or not packed:
        return 1
    if jnp.dtype(dtype).itemsize != 2:
        raise ValueError(f"the Mosaic kernel needs 2- or 4-byte K/V, got {jnp.dtype(dtype)}")
    return 2 if kv_heads % 2 == 0 else kv_heads


def load_heads(block, kv_heads: int, first, count: int, packed: bool):
    """K and V of heads ``first .. first + count - 1`` from a DMA block [keys * 2 *
    kv_heads, D] of VMEM (token-major: K heads, then V heads): ``[(k, v)]``, each [keys, D].

    Strided loads (stride ``2 * kv_heads`` rows; ``first`` static: Mosaic needs a
    dynamic start of a sublane slice to be tile-aligned). Mosaic's
    strided loads need 32-bit data: 2-byte K/V is read (``packed``) as 32-bit words (rows
    ``2i, 2i + 1`` -> word row ``i``, the even row in the low half, as Mosaic packs
    them), one load per two heads. TPU interpret mode has no ref bitcast: there
    (``packed`` False) 2-byte rows are loaded directly.
    """
    heads2 = 2 * kv_heads
    keys = block.shape[0] // heads2
    if jnp.dtype(block.dtype).itemsize == 4 or not packed:  # one head at a time
        assert count == 1, count

        def rows_of(c):
            return block[pl.ds(c, keys, stride=heads2), :]

        return [(rows_of(first), rows_of(first + kv_heads))]
    words = block.bitcast(jnp.uint32)  # [keys * kv_heads, D]
    if kv_heads % 2 == 0:  # two heads a word: first is even, K and V word rows apart
        assert count == 2, count
        pair = first // 2
        k = words[pl.ds(pair, keys, stride=kv_heads), :]
        v = words[pl.ds(pair + kv_heads // 2, keys, stride=kv_heads), :]
        return [
            (unpack_half(k, False, block.dtype), unpack_half(v, False, block.dtype)),
            (unpack_half(k, True, block.dtype), unpack_half(v, True, block.dtype)),
        ]
    assert first == 0 and count == kv_heads, (first, count)  # odd: every head, unrolled
    loaded = {}

    def row_of(c):
        if c // 2 not in loaded:
            loaded[c // 2] = words[pl.ds(c // 2, keys, stride=kv_heads), :]
        return unpack_half(loaded[c // 2], c % 2 == 1, block.dtype)

    return [(row_of(h), row_of(kv_heads + h)) for h in range(kv_heads)]


def _kernel(
    # scalar prefetch (SMEM)
    layer_ref,  # [1] the layer (data, so that every layer shares one compiled kernel)
    tiles_ref,  # [B * T * 3] per row tile: first page column, end column, number of blocks
    # inputs
    bt_ref,  # SMEM [lines, 128] this request's page ids (column c at [c // 128, c % 128])
    *refs,
    num_layers: int,
    num_pages: int,
    kv_heads: int,
    num_tiles: int,
    pages_per_block: int,
    scale: float,
    soft_cap: float | None,
    has_fill: bool,
    has_sinks: bool,
    interpret,
):
    refs = list(refs)
    fill_ref = refs.pop(0) if has_fill else None  # SMEM [lines, 128] valid tokens per page
    q_ref = refs.pop(0)  # [Hkv, BR, D]
    lo_ref, hi_ref = refs.pop(0), refs.pop(0)  # [BR, 1] first / last visible key per row
    lo_t_ref, hi_t_ref = refs.pop(0), refs.pop(0)  # [1, BR] the same, lane-major
    sink_ref = refs.pop(0) if has_sinks else None  # [Hkv, BR, 1] sink logit per row
    (
        kv_hbm,  # [rows, D] in HBM: the pool, page p of layer l at rows (p * L + l) * page_rows
        out_ref,  # [Hkv, BR, D] attention output
        buf,  # VMEM [2, ppb * page_rows, D]
        sems,  # DMA semaphores [2] (one per slot)
        acc_ref,  # VMEM f32 [Hkv, BR, D]
        m_ref,  # VMEM f32 [Hkv, BR, 1]
        l_ref,  # VMEM f32 [Hkv, BR, 1]
    ) = refs
    b, t = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    heads2 = 2 * kv_heads
    ppb = pages_per_block
    page_rows = buf.shape[1] // ppb
    tpp = page_rows // heads2
    block_keys = ppb * tpp
    max_pages = bt_ref.shape[0] * LANES  # padded with -1

    packed = not _interpreting(interpret)
    group = head_group(kv_heads, buf.dtype, packed)
    tile = (b * num_tiles + t) * 3
    first_col, end_col, num_blocks = tiles_ref[tile], tiles_ref[tile + 1], tiles_ref[tile + 2]

    def page_of(blk, i):
        """Page of the i-th page of block blk, and how many of its tokens to read."""
        col = first_col + blk * ppb + i
        col_c = jnp.minimum(col, max_pages - 1)
        line, lane_ = jax.lax.div(col_c, LANES), jax.lax.rem(col_c, LANES)  # col_c >= 0
        page = bt_ref[line, lane_]
        live = col < end_col
        ok = live & (page >= 0) & (page < num_pages)
        tokens = fill_ref[line, lane_] if has_fill else tpp  # keys on the page
        return page, live, ok, tokens

    def copies(blk, slot, i):
        page, _, ok, tokens = page_of(blk, i)
        row = (jnp.where(ok, page, 0) * num_layers + layer) * page_rows
        copy = pltpu.make_async_copy(
            kv_hbm.at[pl.ds(pl.multiple_of(row, page_rows), page_rows)],
            buf.at[slot, pl.ds(pl.multiple_of(i * page_rows, page_rows), page_rows)],
            sems.at[slot],
        )
        return (copy,), ok & (tokens > 0)

    def each_page(method, blk, slot):  # start or wait for the DMAs of block blk, slot
        def one(i, _):
            pair, needed = copies(blk, slot, i)
            pl.when(needed)(functools.partial(_each, method, pair))
            return 0

        jax.lax.fori_loop(0, ppb, one, 0)

    start = functools.partial(each_page, "start")
    wait = functools.partial(each_page, "wait")

    @pl.when(num_blocks > 0)
    def _():
        start(0, 0)

    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    lo, hi = lo_ref[...], hi_ref[...]  # [BR, 1]
    lo_t, hi_t = lo_t_ref[...], hi_t_ref[...]  # [1, BR]
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, block_keys), 1)  # key index in block
    sub = jax.lax.broadcasted_iota(jnp.int32, (block_keys, 1), 0)

    def body(blk, _):
        slot = jax.lax.rem(blk, 2)

        @pl.when(blk + 1 < num_blocks)
        def _():
            start(blk + 1, 1 - slot)

        wait(blk, slot)
        base = (first_col + blk * ppb) * tpp  # absolute position of the block's first key

        # Per key: 1 = key exists on a real page, -1 = on a missing page (a caller bug
        # if visible: NaN as in the reference), 0 = no key. Built page by page, without
        # integer division, in both orientations.
        def page_state(i, states):
            state_l, state_s = states
            _, live, ok, tokens = page_of(blk, i)
            code = jnp.where(ok, 1, jnp.where(live, -1, 0))
            begin = i * tpp
            end = begin + jnp.minimum(tokens, tpp)
            state_l = jnp.where((lane >= begin) & (lane < end), code, state_l)
            state_s = jnp.where((sub >= begin) & (sub < end), code, state_s)
            return state_l, state_s

        zeros = (jnp.zeros((1, block_keys), jnp.int32), jnp.zeros((block_keys, 1), jnp.int32))
        state_l, state_s = jax.lax.fori_loop(0, ppb, page_state, zeros)
        key_l = base + lane  # [1, BK]
        key_s = base + sub  # [BK, 1]
        visible = (key_l >= lo) & (key_l <= hi)  # [BR, BK]
        seen = (key_s >= lo_t) & (key_s <= hi_t)  # [BK, BR]
        used = (jnp.max(seen.astype(jnp.float32), axis=1, keepdims=True) > 0) & (state_s > 0)
        ok = visible & (state_l > 0)
        broken = visible & (state_l < 0)

        def heads(g, _):  # KV heads g * group .. (g + 1) * group - 1 of this block
            first = g * group
            pairs = load_heads(buf.at[slot], kv_heads, first, group, packed)
            for j, (k, v) in enumerate(pairs):  # k, v [BK, D]
                h = first + j
                v = jnp.where(used, v, 0).astype(buf.dtype)  # rows nobody sees may be NaN
                logits = online_softmax.logits(q_ref[h], k, scale=scale, soft_cap=soft_cap)
                carry = (acc_ref[h], m_ref[h], l_ref[h])
                acc, m, den = online_softmax.update(carry, logits, ok, broken, v, keepdims=True)
                acc_ref[h], m_ref[h], l_ref[h] = acc, m, den
            return 0

        for g in range(kv_heads // group):  # unrolled: strided loads need static starts
            heads(g, 0)
        return 0

    jax.lax.fori_loop(0, num_blocks, body, 0)

    # The merge of rows.merge_partials with one split: sinks add mass, no value; a row
    # that saw no key outputs 0; NaN (a visible key on a missing page) stays NaN.
    for h in range(kv_heads):
        m, den = m_ref[h], l_ref[h]  # [BR, 1]
        m_max = jnp.maximum(m, sink_ref[h]) if has_sinks else m
        m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
        w = jnp.exp(m - m_max)
        total = w * den
        if has_sinks:
            total = total + jnp.exp(sink_ref[h] - m_max)
        out = acc_ref[h] * (w / jnp.where(total == 0, 1.0, total))
        out_ref[h] = out.astype(out_ref.dtype)


def default_tiles(*, q_len, group, kv_heads, tokens_per_page, head_dim, dtype, max_pages):
    """(block_rows, pages_per_block) defaults: a decode tile holds the query heads of a
    KV head (the group rounded up to the VMEM tile); a prefill tile 128 rows, fewer with
    many KV heads (every head's q, output and accumulator tiles sit in VMEM at once); a
    DMA block about 256 keys, at most 2 MiB."""
    sublanes = _sublanes(dtype)
    if q_len == 1:
        block_rows = -(-group // sublanes) * sublanes
    else:
        block_rows = max(sublanes, min(PREFILL_ROWS, TILE_ROWS // kv_heads) // sublanes * sublanes)
    page_bytes = tokens_per_page * 2 * kv_heads * head_dim * jnp.dtype(dtype).itemsize
    pages = min(BLOCK_KEYS // tokens_per_page, BLOCK_BYTES // page_bytes, max_pages)
    return block_rows, max(1, pages)


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
    pages_per_block,
    interpret,
):
    batch, q_len, q_heads, head_dim = q.shape
    num_pages, num_layers, tpp, heads2, _ = view.shape
    kv_heads = heads2 // 2
    group = q_heads // kv_heads
    rows_pad = rows.padded_rows(q_len, group, block_rows)
    num_tiles = rows_pad // block_rows
    max_pages = block_tables.shape[1]
    page_rows = tpp * heads2

    q_rows = rows.fold_queries(q, kv_heads, rows_pad, head_dim, view.dtype)  # [B, Hkv, R, D]
    pos = rows.fold_positions(q_positions, group, rows_pad)  # [B, R]
    lo, hi = rows.key_bounds(  # [B, R]
        pos, kv_lens, kind=kind, window=window, chunk=chunk, max_keys=max_pages * tpp
    )
    lo_tile, hi_tile = rows.tile_key_ranges(lo, hi, block_rows)  # [B, T]
    first = lo_tile // tpp
    end = jnp.where(hi_tile >= lo_tile, hi_tile // tpp + 1, first)
    blocks = -(-(end - first) // pages_per_block)
    tiles = jnp.stack([first, end, blocks], axis=-1).reshape(-1)  # [B * T * 3]
    lo_s, hi_s = lo.reshape(batch, rows_pad, 1), hi.reshape(batch, rows_pad, 1)
    lo_l = lo.reshape(batch * num_tiles, 1, block_rows)
    hi_l = hi.reshape(batch * num_tiles, 1, block_rows)
    pool = view.reshape(num_pages * num_layers * page_rows, head_dim)  # the pool: a bitcast

    # The request's row of the table as an SMEM block [lines, 128] (padded with -1 / 0).
    lines = -(-max_pages // LANES)
    table_spec = pl.BlockSpec(
        (None, lines, LANES), lambda b, t, *_: (b, 0, 0), memory_space=pltpu.SMEM
    )

    def lined(x, pad):  # [B, max_pages] -> [B, lines, 128]
        x = jnp.pad(x, ((0, 0), (0, lines * LANES - max_pages)), constant_values=pad)
        return x.reshape(batch, lines, LANES)

    row_s = pl.BlockSpec((None, block_rows, 1), lambda b, t, *_: (b, t, 0))
    row_l = pl.BlockSpec((None, 1, block_rows), lambda b, t, *_: (b * num_tiles + t, 0, 0))
    tile_spec = pl.BlockSpec((None, kv_heads, block_rows, head_dim), lambda b, t, *_: (b, 0, t, 0))
    has_fill, has_sinks = page_fill is not None, sinks is not None
    in_specs = [table_spec] + [table_spec] * has_fill + [tile_spec, row_s, row_s, row_l, row_l]
    args = [lined(block_tables, -1)] + ([lined(page_fill, 0)] if has_fill else [])
    args += [q_rows, lo_s, hi_s, lo_l, hi_l]
    if has_sinks:
        in_specs.append(pl.BlockSpec((kv_heads, block_rows, 1), lambda b, t, *_: (0, t, 0)))
        args.append(rows.fold_sinks(sinks, kv_heads, q_len, rows_pad)[:, :, None])
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
    args.append(pool)

    kernel = functools.partial(
        _kernel,
        num_layers=num_layers,
        num_pages=num_pages,
        kv_heads=kv_heads,
        num_tiles=num_tiles,
        pages_per_block=pages_per_block,
        scale=scale,
        soft_cap=soft_cap,
        has_fill=has_fill,
        has_sinks=has_sinks,
        interpret=interpret,
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, num_tiles),
        in_specs=in_specs,
        out_specs=tile_spec,
        scratch_shapes=[
            pltpu.VMEM((2, pages_per_block * page_rows, head_dim), view.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.VMEM((kv_heads, block_rows, head_dim), jnp.float32),
            pltpu.VMEM((kv_heads, block_rows, 1), jnp.float32),
            pltpu.VMEM((kv_heads, block_rows, 1), jnp.float32),
        ],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, rows_pad, head_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name=f"jenga_paged_attention_{kind}",
    )(jnp.full((1,), layer, jnp.int32), tiles, *args)
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
    (multiple of 8) and ``pages_per_block``: defaults from :func:`default_tiles`.
    ``interpret``: False, True, or a ``pltpu.InterpretParams`` (TPU interpret mode on
    CPU, which also checks DMAs and semaphores).
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
    _, q_len, q_heads, head_dim = q.shape
    _, _, tpp, heads2, _ = view.shape
    rows_default, pages_default = default_tiles(
        q_len=q_len,
        group=q_heads * 2 // heads2,
        kv_heads=heads2 // 2,
        tokens_per_page=tpp,
        head_dim=head_dim,
        dtype=view.dtype,
        max_pages=block_tables.shape[1],
    )
    block_rows = rows_default if block_rows is None else block_rows
    block_rows = positive_int("block_rows", block_rows, minimum=8)
    if block_rows % 8:
        raise ValueError(f"block_rows must be a multiple of 8 (TPU sublanes), got {block_rows}")
    pages_per_block = positive_int(
        "pages_per_block", pages_default if pages_per_block is None else pages_per_block
    )
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
