"""Query rows: the layout both kernels work in, and the merge of their partial results.

A kernel program owns one KV head and a tile of ``block_rows`` *rows*; row ``r`` of
request ``b`` and KV head ``h`` is query ``r // group`` of query head ``h * group +
r % group`` (GQA/MQA heads of one KV head are folded into the row axis, so a decode
step has ``group`` rows and a prefill chunk ``q_len * group``). Each row sees the keys
``lo..hi`` (absolute positions, empty when ``hi < lo``), computed here once from its
query position, so the kernels only compare integers.

Kernels return flash-attention partials per row (``acc`` = sum of p * V, ``m`` = max
logit, ``l`` = sum of p, where p = exp(logit - m)); :func:`merge_partials` combines
split-K partials and the attention sinks in float32.
"""

from __future__ import annotations

import jax.numpy as jnp

EMPTY_LO = 2**30  # lo of a row that sees nothing (so that min over rows ignores it)


def key_bounds(q_positions, kv_lens, *, kind, window=None, chunk=None, max_keys=None):
    """q_positions int32 [B, N] (-1 = padding), kv_lens [B] -> lo, hi int32 [B, N].

    Row ``(b, n)`` sees key ``j`` iff ``lo <= j <= hi``: the reference's visibility
    rules intersected with ``j < kv_len`` (and ``j < max_keys``, the block table's
    capacity, which only a kv_len too large under jit exceeds). Padding rows get
    ``lo = EMPTY_LO, hi = -1``.
    """
    pos = q_positions
    if max_keys is not None:
        kv_lens = jnp.minimum(kv_lens, max_keys)
    last = kv_lens[:, None] - 1  # [B, 1]
    if kind == "cross":
        lo = jnp.zeros_like(pos)
        hi = jnp.broadcast_to(last, pos.shape)
    else:
        hi = jnp.minimum(pos, last)
        if kind == "full":
            lo = jnp.zeros_like(pos)
        elif kind == "sliding":
            lo = jnp.maximum(pos - window + 1, 0)
        elif kind == "chunked":
            lo = pos - jnp.remainder(jnp.maximum(pos, 0), chunk)
        else:
            raise ValueError(f"unknown kind {kind!r}")
    real = (pos >= 0) & (lo <= hi)
    return jnp.where(real, lo, EMPTY_LO), jnp.where(real, hi, -1)


def padded_rows(q_len: int, group: int, block_rows: int) -> int:
    rows = q_len * group
    return -(-rows // block_rows) * block_rows


def fold_queries(q, kv_heads: int, rows_pad: int, head_dim_pad: int, dtype):
    """q [B, Lq, Hq, D] -> [B, Hkv, rows_pad, head_dim_pad] in `dtype` (zero padded)."""
    b, lq, hq, d = q.shape
    g = hq // kv_heads
    x = q.reshape(b, lq, kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, lq * g, d)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, rows_pad - lq * g), (0, head_dim_pad - d)))
    return x.astype(dtype)


def fold_positions(q_positions, group: int, rows_pad: int):
    """q_positions [B, Lq] -> row positions [B, rows_pad] (-1 for padding rows)."""
    b, lq = q_positions.shape
    pos = jnp.repeat(q_positions, group, axis=1)  # row r -> query r // group
    return jnp.pad(pos, ((0, 0), (0, rows_pad - lq * group)), constant_values=-1)


def tile_key_ranges(lo, hi, block_rows: int):
    """Row bounds [B, R] -> each tile's union range lo_t, hi_t [B, R // block_rows].

    An empty tile gets ``lo_t = 0, hi_t = -1``. For rows of consecutive queries the
    union of their ranges has no hole, so every key in ``lo_t..hi_t`` is seen by some
    row; kernels still mask per row, so holes (scattered positions) stay correct.
    """
    b, r = lo.shape
    lo_t = jnp.min(lo.reshape(b, r // block_rows, block_rows), axis=-1)
    hi_t = jnp.max(hi.reshape(b, r // block_rows, block_rows), axis=-1)
    empty = hi_t < lo_t
    return jnp.where(empty, 0, lo_t), jnp.where(empty, -1, hi_t)


def fold_sinks(sinks, kv_heads: int, q_len: int, rows_pad: int):
    """sinks [Hq] -> per-row sink logits f32 [Hkv, rows_pad] (or None)."""
    if sinks is None:
        return None
    g = sinks.shape[0] // kv_heads
    rows = jnp.tile(sinks.astype(jnp.float32).reshape(kv_heads, g), (1, q_len))  # [Hkv, Lq*G]
    return jnp.pad(rows, ((0, 0), (0, rows_pad - q_len * g)))


def merge_partials(acc, m, den, sink_rows):
    """Split-K partials -> attention output (f32).

    acc [B, Hkv, S, R, Dp]; m, den [B, Hkv, S, R] (m = -inf where a split saw no key);
    sink_rows [Hkv, R] or None -> [B, Hkv, R, Dp]. A row that saw no key outputs 0
    (with or without a sink); NaN in m (a visible key on a missing page) stays NaN.
    """
    m_max = jnp.max(m, axis=2)  # [B, Hkv, R]
    if sink_rows is not None:
        m_max = jnp.maximum(m_max, sink_rows[None])
    m_max = jnp.where(jnp.isneginf(m_max), 0.0, m_max)
    w = jnp.exp(m - m_max[:, :, None])  # [B, Hkv, S, R]; -inf -> 0
    num = jnp.sum(w[..., None] * acc, axis=2)
    total = jnp.sum(w * den, axis=2)
    if sink_rows is not None:
        total = total + jnp.exp(sink_rows[None] - m_max)  # the sink adds mass, no value
    return num / jnp.where(total == 0, 1.0, total)[..., None]


def unfold_output(out, q_len: int, group: int, head_dim: int, dtype):
    """[B, Hkv, rows_pad, Dp] -> [B, q_len, Hkv * group, head_dim] in `dtype`."""
    b, hkv = out.shape[:2]
    out = out[:, :, : q_len * group, :head_dim].reshape(b, hkv, q_len, group, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, q_len, hkv * group, head_dim).astype(dtype)
