"""Pure-JAX reference paged attention: the oracle for kernels and models.

The KV pool is one buffer ``[rows, lane]`` (``lane`` divides every kind's page; it is
the head dim where the kinds share one). Each layer kind sees it through a zero-copy
reshape (:func:`kind_view`), token-major with K and V heads merged::

    view[page, layer, offset, head, dim]    # head < kv_heads: K; kv_heads + h: V of head h

Small page ``p`` of a kind is ``view[p]``, at flat offset ``p * page_elems`` of the pool.
With ``head_dim`` minor and the merged heads second-minor, the reshape is a bitcast
under TPU tiling too (docs/device.md, "The pool on TPU").
Token ``t`` of a request lives on page ``block_table[t // tokens_per_page]`` at offset
``t % tokens_per_page``.

Everything here is written to be obviously correct, not fast: keys are gathered into
a dense ``[batch, max_pages * tokens_per_page]`` sequence and masked. Logits and the
softmax are computed in float32 whatever the input dtype.

Visibility of key ``j`` (absolute position) to the query at position ``i``:

- ``"full"``: ``j <= i``
- ``"sliding"``: ``i - window < j <= i``
- ``"chunked"``: ``j <= i`` and ``j // chunk == i // chunk``
- ``"cross"``: every key (positions ignored, except ``-1`` marking a padding query)

and always ``j < kv_len``. A padding query (position ``-1``) outputs exactly 0.

With ``key_offsets`` (the paged baseline stores a request's image tokens ahead of its
text in every layer's token stream), slot ``j`` of row ``b`` holds the key at position
``j - key_offsets[b]``; the slots below the offset are not keys of a self-attention layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jenga_jax.device.inplace import scatter_set

KINDS = ("full", "sliding", "chunked", "cross")

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- checks


def _traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _int_array(name: str, x, ndim: int) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {x.shape}")
    return x.astype(jnp.int32)


def _check_view(view) -> None:
    if view.ndim != 5 or view.shape[3] % 2:
        raise ValueError(
            "view must be [pages, layers, tokens_per_page, 2 * kv_heads, head_dim] "
            f"(see kind_view), got shape {view.shape}"
        )


def view_dims(view) -> tuple[int, int, int, int]:
    """view [pages, layers, tpp, 2 * kv_heads, head_dim] -> (pages, kv_heads, tpp, head_dim)."""
    num_pages, _, tpp, heads2, head_dim = view.shape
    return num_pages, heads2 // 2, tpp, head_dim


def _check_layer(layer, view) -> None:
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer < view.shape[1]:
        raise ValueError(f"layer must be an int in [0, {view.shape[1]}), got {layer!r}")


def _check_kind(kind, window, chunk) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "sliding":
        if not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"kind 'sliding' needs an int window >= 1, got {window!r}")
    elif window is not None:
        raise ValueError(f"window is only for kind 'sliding', got window={window!r} for {kind!r}")
    if kind == "chunked":
        if not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise ValueError(f"kind 'chunked' needs an int chunk >= 1, got {chunk!r}")
    elif chunk is not None:
        raise ValueError(f"chunk is only for kind 'chunked', got chunk={chunk!r} for {kind!r}")


def _check_heads(q_heads: int, kv_heads: int) -> None:
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(
            f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads}) for GQA/MQA"
        )


def _check_options(q_heads: int, scale, soft_cap, sinks) -> jax.Array | None:
    if scale is None:
        raise ValueError("scale is required (usually head_dim ** -0.5)")
    if soft_cap is not None and not _traced(soft_cap) and not float(soft_cap) > 0:
        raise ValueError(f"soft_cap must be > 0 or None, got {soft_cap!r}")
    if sinks is None:
        return None
    sinks = jnp.asarray(sinks)
    if sinks.shape != (q_heads,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise ValueError(
            f"sinks must be a float array of shape ({q_heads},) (one logit per query head), "
            f"got {sinks.dtype} {sinks.shape}"
        )
    return sinks


# --------------------------------------------------------------------------- pool views


def kind_view(pool, *, num_layers: int, kv_heads: int, tokens_per_page: int, head_dim: int):
    """Zero-copy view of the pool for one layer kind.

    pool [rows, lane] -> [num_pages, num_layers, tokens_per_page, 2 * kv_heads, head_dim]
    (K heads, then V heads), where one small page has ``page_elems = num_layers *
    tokens_per_page * 2 * kv_heads * head_dim`` elements and ``num_pages = pool.size //
    page_elems``. Any 2-D pool whose size is whole pages works; on TPU the view is a
    bitcast when ``lane == head_dim``.
    """
    if pool.ndim != 2:
        raise ValueError(f"pool must be [rows, lane], got {pool.shape}")
    dims = dict(
        num_layers=num_layers, kv_heads=kv_heads, tokens_per_page=tokens_per_page, head_dim=head_dim
    )
    for name, d in dims.items():
        if not isinstance(d, (int, np.integer)) or d < 1:
            raise ValueError(f"{name} must be a positive int, got {d!r}")
    page_elems = num_layers * tokens_per_page * 2 * kv_heads * head_dim
    if pool.size % page_elems:
        raise ValueError(
            f"the pool {list(pool.shape)} is not a whole number of this kind's small pages "
            f"({page_elems} elements = {num_layers} layers x {tokens_per_page} tokens x 2 x "
            f"{kv_heads} kv_heads x {head_dim} head_dim)"
        )
    num_pages = pool.size // page_elems
    return pool.reshape(num_pages, num_layers, tokens_per_page, 2 * kv_heads, head_dim)


def write_kv(view, k, v, slot_pages, slot_offsets, *, layer: int, after=None):
    """Scatter new K/V of one layer into the view; returns the new view.

    view [pages, layers, tpp, 2 * kv_heads, head_dim]; k, v [num_tokens, kv_heads,
    head_dim] (cast to view.dtype); slot_pages, slot_offsets int [num_tokens]. Token ``t``
    goes to ``view[slot_pages[t], layer, slot_offsets[t]]`` (K heads, then V heads).
    ``slot_pages[t] == -1`` marks padding: nothing is written for it. Out-of-range
    slots raise when the indices are concrete; under jit they are dropped, never
    clipped onto a real page.

    after: an array the write must follow (K/V that do not depend on the previous
    layers, e.g. image K/V, pass the layer's queries). It rides in a dropped padding
    slot, so that XLA sees the earlier reads of the pool ordered before this in-place
    write; otherwise XLA:CPU may copy the whole pool.

    A bfloat16 (narrow-float) view is scattered on its bits on CPU
    (:func:`jenga_jax.device.inplace.scatter_set`), in place and bit for bit.
    """
    _check_view(view)
    _check_layer(layer, view)
    num_pages, kv_heads, tpp, head_dim = view_dims(view)
    k, v = jnp.asarray(k), jnp.asarray(v)
    if k.ndim != 3 or k.shape[1:] != (kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(
            f"k and v must both be [num_tokens, {kv_heads}, {head_dim}] for this view, "
            f"got {k.shape} and {v.shape}"
        )
    pages = _int_array("slot_pages", slot_pages, 1)
    offsets = _int_array("slot_offsets", slot_offsets, 1)
    if pages.shape != (k.shape[0],) or offsets.shape != (k.shape[0],):
        raise ValueError(
            f"slot_pages and slot_offsets must be [{k.shape[0]}], "
            f"got {pages.shape} and {offsets.shape}"
        )
    if not _traced(pages, offsets):
        p, o = np.asarray(pages), np.asarray(offsets)
        real = p != -1
        if np.any((p < -1) | (p >= num_pages)):
            raise ValueError(f"slot_pages must be -1 (padding) or in [0, {num_pages}), got {p}")
        if np.any(real & ((o < 0) | (o >= tpp))):
            raise ValueError(f"slot_offsets of real tokens must be in [0, {tpp}), got {o}")
    # JAX wraps negative indices (-1 -> last page) even with mode="drop", so every slot
    # that is not a real in-range slot is sent to page `num_pages`, which "drop" skips.
    ok = (pages >= 0) & (pages < num_pages) & (offsets >= 0) & (offsets < tpp)
    pages = jnp.where(ok, pages, num_pages)
    kv = jnp.concatenate([k, v], axis=1).astype(view.dtype)  # [num_tokens, 2 * kv_heads, D]
    if kv.shape[0] == 1 or after is not None:
        # A dropped padding slot. With one slot, XLA rewrites the scatter into a
        # dynamic-update-slice, which XLA:CPU does not update in place (it copies the
        # whole pool); the padding keeps it a scatter. It also carries `after`.
        pad = jnp.zeros_like(kv[:1])
        if after is not None:
            pad = pad + jnp.sum(jnp.asarray(after, jnp.float32)).astype(kv.dtype)
        pages = jnp.concatenate([pages, jnp.full((1,), num_pages, jnp.int32)])
        offsets = jnp.concatenate([offsets, jnp.zeros((1,), jnp.int32)])
        kv = jnp.concatenate([kv, pad])
    # A narrow-float view is scattered on its bits on CPU (see inplace.py).
    index = (pages, layer, offsets)  # -> [num_tokens, 2 * kv_heads, head_dim]
    return scatter_set(view, index, kv)


# --------------------------------------------------------------------------- attention


def _visible(q_pos, k_pos, *, kind, window, chunk):
    """q_pos [B, Lq], k_pos [B, S] (-1: padding) -> bool [B, Lq, S]."""
    i = q_pos[:, :, None]
    j = k_pos[:, None, :]
    vis = (i >= 0) & (j >= 0)
    if kind == "full":
        vis &= j <= i
    elif kind == "sliding":
        vis &= (j <= i) & (j > i - window)
    elif kind == "chunked":
        vis &= (j <= i) & (j // chunk == i // chunk)
    return vis  # "cross": every real key


def _attend(q, k, v, visible, *, scale, soft_cap, sinks):
    """q [B, Lq, Hq, D]; k, v [B, S, Hkv, D]; visible bool [B, Lq, S] -> f32 [B, Lq, Hq, D]."""
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    # Keys no query sees may hold anything (NaN): select them away before any arithmetic.
    used = jnp.any(visible, axis=1)[:, :, None, None]  # [B, S, 1, 1]
    kf = jnp.where(used, k.astype(jnp.float32), 0.0)
    vf = jnp.where(used, v.astype(jnp.float32), 0.0)
    qf = q.astype(jnp.float32).reshape(b, lq, hkv, g, d)  # query head h -> kv head h // g
    logits = jnp.einsum("bqhgd,bshd->bhgqs", qf, kf, precision=_HIGHEST) * scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)  # [B, Hkv, G, Lq, S]
    m = jnp.max(logits, axis=-1)  # [B, Hkv, G, Lq]
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(1, hkv, g, 1)
        m = jnp.maximum(m, sink)
    m = jnp.where(jnp.isneginf(m), 0.0, m)  # no visible key: avoid -inf - -inf
    p = jnp.exp(logits - m[..., None])  # masked -> exactly 0
    denom = jnp.sum(p, axis=-1)
    if sinks is not None:
        denom += jnp.exp(sink - m)  # the sink joins the denominator, adds no value
    out = jnp.einsum("bhgqs,bshd->bhgqd", p, vf, precision=_HIGHEST)
    out = out / jnp.where(denom == 0, 1.0, denom)[..., None]  # no visible key -> 0
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, d)


def check_paged_inputs(
    q,
    view,
    block_tables,
    kv_lens,
    q_positions,
    *,
    layer,
    kind,
    window,
    chunk,
    scale,
    soft_cap,
    sinks,
    page_fill=None,
):
    """Validate :func:`paged_attention`'s arguments (every backend shares this).

    Values are checked when concrete; under ``jit`` only shapes and dtypes. Returns
    ``(q, block_tables, kv_lens, q_positions, sinks, page_fill)``, integer arrays int32.
    """
    _check_view(view)
    _check_layer(layer, view)
    _check_kind(kind, window, chunk)
    num_pages, kv_heads, tpp, head_dim = view_dims(view)
    q = jnp.asarray(q)
    if q.ndim != 4 or q.shape[3] != head_dim:
        raise ValueError(
            f"q must be [batch, q_len, q_heads, {head_dim}] for this view, got {q.shape}"
        )
    batch, q_len, q_heads, _ = q.shape
    _check_heads(q_heads, kv_heads)
    sinks = _check_options(q_heads, scale, soft_cap, sinks)
    block_tables = _int_array("block_tables", block_tables, 2)
    kv_lens = _int_array("kv_lens", kv_lens, 1)
    q_positions = _int_array("q_positions", q_positions, 2)
    max_pages = block_tables.shape[1]
    if block_tables.shape[0] != batch or kv_lens.shape != (batch,):
        raise ValueError(
            f"block_tables must be [{batch}, max_pages] and kv_lens [{batch}], "
            f"got {block_tables.shape} and {kv_lens.shape}"
        )
    if q_positions.shape != (batch, q_len):
        raise ValueError(f"q_positions must be [{batch}, {q_len}], got {q_positions.shape}")
    if page_fill is not None:
        if kind != "cross":
            raise ValueError(f"page_fill is only for kind 'cross', got it for {kind!r}")
        page_fill = _int_array("page_fill", page_fill, 2)
        if page_fill.shape != block_tables.shape:
            raise ValueError(
                f"page_fill must be {list(block_tables.shape)} like block_tables, "
                f"got {page_fill.shape}"
            )
        if not _traced(page_fill):
            pf = np.asarray(page_fill)
            if np.any((pf < 0) | (pf > tpp)):
                raise ValueError(f"page_fill entries must be in [0, {tpp}], got {pf}")
    if not _traced(block_tables, kv_lens, q_positions):
        bt, kl, qp = np.asarray(block_tables), np.asarray(kv_lens), np.asarray(q_positions)
        if np.any((bt < -1) | (bt >= num_pages)):
            raise ValueError(f"block_tables entries must be -1 or in [0, {num_pages})")
        if np.any((kl < 0) | (kl > max_pages * tpp)):
            raise ValueError(
                f"kv_lens must be in [0, max_pages * tokens_per_page = {max_pages * tpp}], got {kl}"
            )
        if np.any(qp < -1):
            raise ValueError("q_positions must be >= 0, or -1 for padding queries")
        if kind != "cross" and np.any(qp >= kl[:, None]):
            raise ValueError(
                "a query at position i needs its own key: q_positions must be < kv_lens "
                "(write the step's K/V before attention)"
            )

    return q, block_tables, kv_lens, q_positions, sinks, page_fill


def _check_key_offsets(key_offsets, kv_lens, q_positions, kind: str) -> jax.Array:
    """key_offsets int [B] -> int32, in [0, kv_lens] and below every query's own key."""
    if kind == "cross":
        raise ValueError("key_offsets is for self-attention kinds, not 'cross'")
    key_offsets = _int_array("key_offsets", key_offsets, 1)
    if key_offsets.shape != kv_lens.shape:
        raise ValueError(f"key_offsets must be {list(kv_lens.shape)}, got {key_offsets.shape}")
    if not _traced(key_offsets, kv_lens, q_positions):
        ko, kl, qp = np.asarray(key_offsets), np.asarray(kv_lens), np.asarray(q_positions)
        if np.any((ko < 0) | (ko > kl)):
            raise ValueError(f"key_offsets must be in [0, kv_lens], got {ko} (kv_lens {kl})")
        if np.any(qp >= (kl - ko)[:, None]):
            raise ValueError(
                "a query at position i needs its own key in slot i + key_offset: "
                "q_positions must be < kv_lens - key_offsets"
            )
    return key_offsets


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
    key_offsets=None,
):
    """Attention of queries over one layer's paged K/V.

    q [batch, q_len, q_heads, head_dim]; view [pages, layers, tpp, 2 * kv_heads, head_dim];
    block_tables int [batch, max_pages] (entry i: page of tokens [i*tpp, (i+1)*tpp), -1 if
    none); kv_lens int [batch] (keys 0..kv_len-1 are valid); q_positions int [batch, q_len]
    (absolute positions, -1 = padding query). sinks: optional float [q_heads] sink logits.
    page_fill: optional int [batch, max_pages], kind "cross" only: page i holds
    page_fill[b, i] valid keys at its first offsets (several images, each starting on a
    fresh page); key (i, o) is then valid iff o < page_fill[b, i] and i * tpp + o < kv_len.
    key_offsets: optional int [batch], self-attention kinds only (the pure-JAX backend):
    slot j holds the key at position j - key_offsets[b]; slots below it are no keys.
    Returns [batch, q_len, q_heads, head_dim] in q.dtype.

    Only the pages of visible keys are read: a page outside every query's visible range
    may be -1 or hold garbage (NaN). A visible key on a page that is -1 (or out of range)
    is a caller bug and makes that query's output NaN; with concrete inputs, out-of-range
    ids, lengths and positions raise ValueError instead.
    """
    q, block_tables, kv_lens, q_positions, sinks, page_fill = check_paged_inputs(
        q, view, block_tables, kv_lens, q_positions, layer=layer, kind=kind, window=window,
        chunk=chunk, scale=scale, soft_cap=soft_cap, sinks=sinks, page_fill=page_fill,
    )  # fmt: skip
    offsets = jnp.zeros_like(kv_lens)  # [B]
    if key_offsets is not None:
        offsets = _check_key_offsets(key_offsets, kv_lens, q_positions, kind)
    num_pages, kv_heads, tpp, head_dim = view_dims(view)
    batch, q_len, q_heads, _ = q.shape
    max_pages = block_tables.shape[1]

    # Gather every page of the table (clamped ids; invalid ones are masked below).
    seq = max_pages * tpp
    pages = jnp.clip(block_tables, 0, num_pages - 1)
    kv = view[pages, layer].reshape(batch, seq, 2 * kv_heads, head_dim)  # [B, S, 2Hkv, D]
    j = jnp.arange(seq, dtype=jnp.int32)
    is_key = (j[None, :] < kv_lens[:, None]) & (j[None, :] >= offsets[:, None])
    k_pos = jnp.where(is_key, j[None, :] - offsets[:, None], -1)  # [B, S]
    page_ok = (block_tables >= 0) & (block_tables < num_pages)
    key_ok = jnp.repeat(page_ok, tpp, axis=1)  # [B, S]
    if page_fill is not None:
        filled = jnp.arange(tpp)[None, None, :] < page_fill[:, :, None]  # [B, P, tpp]
        k_pos = jnp.where(filled.reshape(batch, seq), k_pos, -1)
    visible = _visible(q_positions, k_pos, kind=kind, window=window, chunk=chunk)
    broken = jnp.any(visible & ~key_ok[:, None, :], axis=-1)  # [B, Lq]
    out = _attend(
        q,
        kv[:, :, :kv_heads],
        kv[:, :, kv_heads:],
        visible & key_ok[:, None, :],
        scale=scale,
        soft_cap=soft_cap,
        sinks=sinks,
    )
    out = jnp.where(broken[:, :, None, None], jnp.nan, out)
    return out.astype(q.dtype)


def dense_attention(
    q,
    k,
    v,
    q_positions,
    k_positions,
    *,
    kind: str,
    window: int | None = None,
    chunk: int | None = None,
    scale: float,
    soft_cap: float | None = None,
    sinks=None,
):
    """The oracle: same semantics as :func:`paged_attention` on contiguous K/V.

    q [batch, q_len, q_heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim];
    q_positions int [batch, q_len], k_positions int [batch, kv_len] (absolute positions,
    -1 = padding). Returns [batch, q_len, q_heads, head_dim] in q.dtype.
    """
    _check_kind(kind, window, chunk)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(
            "q must be [batch, q_len, q_heads, head_dim] and k, v both "
            f"[batch, kv_len, kv_heads, head_dim], got {q.shape}, {k.shape}, {v.shape}"
        )
    batch, q_len, q_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k, v {k.shape} do not match q {q.shape} in batch or head_dim")
    _check_heads(q_heads, k.shape[2])
    sinks = _check_options(q_heads, scale, soft_cap, sinks)
    q_positions = _int_array("q_positions", q_positions, 2)
    k_positions = _int_array("k_positions", k_positions, 2)
    if q_positions.shape != (batch, q_len) or k_positions.shape != k.shape[:2]:
        raise ValueError(
            f"q_positions must be [{batch}, {q_len}] and k_positions {list(k.shape[:2])}, "
            f"got {q_positions.shape} and {k_positions.shape}"
        )
    visible = _visible(q_positions, k_positions, kind=kind, window=window, chunk=chunk)
    out = _attend(q, k, v, visible, scale=scale, soft_cap=soft_cap, sinks=sinks)
    return out.astype(q.dtype)
