"""The pure-JAX reference paged attention against dense attention and a numpy loop."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jenga_jax.device.reference_attention import (
    dense_attention,
    kind_view,
    paged_attention,
    write_kv,
)

WINDOW, CHUNK = 5, 6
OPTS = {
    "full": {},
    "sliding": {"window": WINDOW},
    "chunked": {"chunk": CHUNK},
    "cross": {},
}


def _normal(seed: int, shape, scale: float = 1.0) -> np.ndarray:
    """Standard normal values; one fixed draw shape, so jax.random compiles only once."""
    size = math.prod(shape)
    assert size <= 1 << 14
    draw = jax.random.normal(jax.random.key(seed), (1 << 14,), jnp.float32)
    return np.array(draw[:size]).reshape(shape) * scale


def _as(x: np.ndarray, dtype) -> np.ndarray:
    """Round to `dtype` and back to float32 (the values the kernels really see)."""
    return np.array(jnp.asarray(x).astype(dtype).astype(jnp.float32))


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _visible(kind: str, i: int, j: int) -> bool:
    if kind == "full":
        return j <= i
    if kind == "sliding":
        return i - WINDOW < j <= i
    if kind == "chunked":
        return j <= i and j // CHUNK == i // CHUNK
    return True


def numpy_attention(q, k, v, q_pos, k_pos, *, kind, scale, soft_cap=None, sinks=None):
    """Loop-by-loop float64 attention: the oracle of the oracle."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, q_heads, head_dim = q.shape
    group = q_heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for t in range(q_len):
            i = int(q_pos[b, t])
            if i < 0:
                continue
            keys = [s for s, j in enumerate(k_pos[b]) if j >= 0 and _visible(kind, i, j)]
            for h in range(q_heads):
                kh = h // group
                logits = k[b, keys, kh] @ q[b, t, h] * scale
                if soft_cap is not None:
                    logits = soft_cap * np.tanh(logits / soft_cap)
                m = max([*logits, *([] if sinks is None else [sinks[h]])], default=0.0)
                e = np.exp(logits - m)
                den = e.sum() + (0.0 if sinks is None else np.exp(sinks[h] - m))
                if den > 0:
                    out[b, t, h] = e @ v[b, keys, kh] / den
    return out


def build_pool(seed, kv_lens, *, tpp, kv_heads, head_dim, num_layers, layer, dtype, max_pages):
    """Random K/V of each request on randomly permuted pages; everything else NaN.

    Returns (pool, block_tables, k, v, k_positions) where k, v [batch, max_pages*tpp,
    kv_heads, head_dim] are the dense float32 values (NaN past kv_len) already rounded
    to `dtype`.
    """
    batch, seq = len(kv_lens), max_pages * tpp
    need = [math.ceil(n / tpp) for n in kv_lens]
    num_pages = 2 * ((sum(need) + 3 + 1) // 2)  # a few unused pages, an even count
    view = np.full((num_pages, num_layers, tpp, 2 * kv_heads, head_dim), np.nan, np.float32)
    k = _as(_normal(seed, (batch, seq, kv_heads, head_dim)), dtype)
    v = _as(_normal(seed + 1, (batch, seq, kv_heads, head_dim)), dtype)
    perm = np.asarray(jax.random.permutation(jax.random.key(seed + 2), num_pages))
    block_tables = np.full((batch, max_pages), -1, np.int32)
    k_pos = np.full((batch, seq), -1, np.int32)
    nxt = 0
    for b, n in enumerate(kv_lens):
        k[b, n:] = np.nan
        v[b, n:] = np.nan
        k_pos[b, :n] = np.arange(n)
        for i in range(need[b]):
            p = perm[nxt]
            nxt += 1
            block_tables[b, i] = p
            toks = slice(i * tpp, (i + 1) * tpp)
            view[p, layer, :, :kv_heads] = k[b, toks]
            view[p, layer, :, kv_heads:] = v[b, toks]
    pool = jnp.asarray(view.reshape(-1, head_dim)).astype(dtype)  # [rows, lane]
    return pool, block_tables, k, v, k_pos


# ----------------------------------------------------------------- paged == dense == numpy

KV_LENS = [1, 13, 16, 7]  # one token, mid-page, page boundary, mid-page (tpp 4)
Q_POS = np.array([[-1, 0, -1, -1], [9, 10, 11, 12], [13, -1, 14, 15], [5, 6, -1, -1]], np.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads", [(8, 2), (4, 1), (2, 2)], ids=["gqa", "mqa", "mha"])
@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize(
    "soft_cap,use_sinks", [(None, False), (2.0, False), (None, True), (2.0, True)]
)
def test_paged_matches_dense(kind, heads, dtype, soft_cap, use_sinks):
    q_heads, kv_heads = heads
    tpp, head_dim, max_pages, layer = 4, 16, 5, 1
    seed = 7 * q_heads + kv_heads
    pool, bt, k, v, k_pos = build_pool(
        seed,
        KV_LENS,
        tpp=tpp,
        kv_heads=kv_heads,
        head_dim=head_dim,
        num_layers=2,
        layer=layer,
        dtype=dtype,
        max_pages=max_pages,
    )
    view = kind_view(pool, num_layers=2, kv_heads=kv_heads, tokens_per_page=tpp, head_dim=head_dim)
    q = jnp.asarray(_normal(seed + 3, (4, 4, q_heads, head_dim))).astype(dtype)
    sinks = jnp.asarray(_normal(seed + 4, (q_heads,), 1.5)) if use_sinks else None
    opts = dict(kind=kind, scale=0.5, soft_cap=soft_cap, sinks=sinks, **OPTS[kind])
    kv_lens = jnp.asarray(KV_LENS, jnp.int32)

    got = paged_attention(q, view, bt, kv_lens, Q_POS, layer=layer, **opts)
    dense = dense_attention(q, k.astype(dtype), v.astype(dtype), Q_POS, k_pos, **opts)
    want = numpy_attention(
        np.asarray(q.astype(jnp.float32)),
        k,
        v,
        Q_POS,
        k_pos,
        kind=kind,
        scale=0.5,
        soft_cap=soft_cap,
        sinks=None if sinks is None else np.asarray(sinks),
    )

    assert got.shape == q.shape and got.dtype == dtype
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    assert np.all(np.asarray(got)[Q_POS < 0] == 0)  # padding queries: exactly 0
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert _rel_err(got, dense) <= tol
    assert _rel_err(dense, want) <= tol
    assert _rel_err(got, want) <= tol


@pytest.mark.parametrize("kind", list(OPTS))
def test_dense_with_holes_matches_numpy(kind):
    """Key positions need not be a prefix: -1 holes anywhere are not keys."""
    k_pos = np.array([[0, 1, -1, 3, 4, 5, -1, 7, 8, 9]], np.int32)
    q_pos = np.array([[9, 4, -1, 7, 0]], np.int32)
    q = _normal(1, (1, 5, 4, 16))
    k, v = _normal(2, (1, 10, 2, 16)), _normal(3, (1, 10, 2, 16))
    k[:, k_pos[0] < 0] = np.nan
    sinks = _normal(4, (4,))
    got = dense_attention(q, k, v, q_pos, k_pos, kind=kind, scale=0.3, sinks=sinks, **OPTS[kind])
    want = numpy_attention(q, k, v, q_pos, k_pos, kind=kind, scale=0.3, sinks=sinks)
    assert _rel_err(got, want) <= 1e-5


def test_jit_matches_eager():
    pool, bt, *_ = build_pool(
        11,
        KV_LENS,
        tpp=4,
        kv_heads=2,
        head_dim=16,
        num_layers=1,
        layer=0,
        dtype=jnp.float32,
        max_pages=5,
    )
    view = kind_view(pool, num_layers=1, kv_heads=2, tokens_per_page=4, head_dim=16)
    q = jnp.asarray(_normal(12, (4, 4, 8, 16)))
    opts = dict(layer=0, kind="sliding", window=WINDOW, scale=0.25, soft_cap=3.0)
    eager = paged_attention(q, view, bt, jnp.asarray(KV_LENS), Q_POS, **opts)
    jitted = jax.jit(functools.partial(paged_attention, **opts))(
        q, view, bt, jnp.asarray(KV_LENS), Q_POS
    )
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


# ----------------------------------------------------------------- released pages


@pytest.mark.parametrize("stale_ids", [False, True], ids=["minus1", "stale"])
@pytest.mark.parametrize("kind", ["sliding", "chunked"])
def test_pages_before_window_are_never_read(kind, stale_ids):
    """Pages wholly before the window/chunk: -1 in the table (or a stale id) and NaN."""
    tpp, kv_lens = 4, [30, 23]
    pool, bt, k, v, k_pos = build_pool(
        21,
        kv_lens,
        tpp=tpp,
        kv_heads=2,
        head_dim=16,
        num_layers=1,
        layer=0,
        dtype=jnp.float32,
        max_pages=8,
    )
    q_pos = np.array([[26, 27, 28, 29], [20, 21, 22, -1]], np.int32)
    opts = dict(kind=kind, scale=0.5, **OPTS[kind])
    # First key any query of the request can see; its page and later ones stay.
    first = [
        min(j for j in range(n) for i in q_pos[b] if i >= 0 and _visible(kind, i, j))
        for b, n in enumerate(kv_lens)
    ]
    view = np.asarray(pool).reshape(-1, 1, tpp, 4, 16).copy()
    bt = bt.copy()
    nan_page = int(np.setdiff1d(np.arange(view.shape[0]), bt)[0])  # an unused (NaN) page
    for b, f in enumerate(first):
        for i in range(f // tpp):
            view[bt[b, i]] = np.nan  # released and overwritten
            bt[b, i] = nan_page if stale_ids else -1
    assert all(f >= 2 * tpp for f in first)  # at least two released pages per request
    pool = jnp.asarray(view.reshape(pool.shape))
    q = jnp.asarray(_normal(22, (2, 4, 4, 16)))
    got = paged_attention(
        q,
        kind_view(pool, num_layers=1, kv_heads=2, tokens_per_page=tpp, head_dim=16),
        bt,
        jnp.asarray(kv_lens),
        q_pos,
        layer=0,
        **opts,
    )
    want = dense_attention(q, k, v, q_pos, k_pos, **opts)
    assert np.all(np.isfinite(np.asarray(got)))
    assert _rel_err(got, want) <= 1e-5
    # The NaN pages are selected away, not multiplied by 0: gradients stay finite too.
    view = kind_view(pool, num_layers=1, kv_heads=2, tokens_per_page=tpp, head_dim=16)
    lens = jnp.asarray(kv_lens)
    grad = jax.grad(lambda q: paged_attention(q, view, bt, lens, q_pos, layer=0, **opts).sum())(q)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_visible_key_on_missing_page_gives_nan():
    """A -1 page inside the visible range is a host bug: that query's output is NaN."""
    pool, bt, *_ = build_pool(
        31,
        [12],
        tpp=4,
        kv_heads=1,
        head_dim=16,
        num_layers=1,
        layer=0,
        dtype=jnp.float32,
        max_pages=3,
    )
    bt = bt.copy()
    bt[0, 1] = -1  # tokens 4..7
    view = kind_view(pool, num_layers=1, kv_heads=1, tokens_per_page=4, head_dim=16)
    q_pos = np.array([[3, 7, 11, -1]], np.int32)
    got = np.asarray(
        paged_attention(
            jnp.ones((1, 4, 2, 16)),
            view,
            bt,
            jnp.asarray([12]),
            q_pos,
            layer=0,
            kind="sliding",
            window=4,
            scale=0.25,
        )
    )
    assert np.all(np.isfinite(got[0, 0])) and np.all(np.isfinite(got[0, 2]))  # 0..3, 8..11
    assert np.all(np.isnan(got[0, 1]))  # needs 4..7
    assert np.all(got[0, 3] == 0)


# ----------------------------------------------------------------- write_kv


@pytest.mark.parametrize("kind", list(OPTS))
def test_decode_step_write_then_attend(kind):
    """One new token per request written into its slot, then attended (tpp 8, head_dim 32)."""
    tpp, head_dim, kv_heads, q_heads = 8, 32, 2, 8
    kv_lens = [1, 9, 21, 4]  # after the step; the new token is the last one
    pool, bt, k, v, k_pos = build_pool(
        41,
        kv_lens,
        tpp=tpp,
        kv_heads=kv_heads,
        head_dim=head_dim,
        num_layers=2,
        layer=0,
        dtype=jnp.float32,
        max_pages=3,
    )
    view = kind_view(pool, num_layers=2, kv_heads=kv_heads, tokens_per_page=tpp, head_dim=head_dim)
    # Erase the new tokens' slots: only write_kv may fill them.
    last = [n - 1 for n in kv_lens]
    pages = np.array([bt[b, t // tpp] for b, t in enumerate(last)] + [-1, -1], np.int32)
    offsets = np.array([t % tpp for t in last] + [0, tpp - 1], np.int32)
    view = view.at[pages[:4], 0, offsets[:4]].set(jnp.nan)
    new_k = np.concatenate([k[np.arange(4), last], _normal(42, (2, kv_heads, head_dim))])
    new_v = np.concatenate([v[np.arange(4), last], _normal(43, (2, kv_heads, head_dim))])

    view = write_kv(view, new_k, new_v, pages, offsets, layer=0)
    q = jnp.asarray(_normal(44, (4, 1, q_heads, head_dim)))
    q_pos = np.array(last, np.int32)[:, None]
    opts = dict(kind=kind, scale=head_dim**-0.5, **OPTS[kind])
    got = paged_attention(q, view, bt, jnp.asarray(kv_lens), q_pos, layer=0, **opts)
    want = dense_attention(q, k, v, q_pos, k_pos, **opts)
    assert np.all(np.isfinite(np.asarray(got)))
    assert _rel_err(got, want) <= 1e-5


def test_padding_slots_leave_pool_bit_identical():
    pool = jnp.asarray(_normal(51, (4, 2 * 2 * 4 * 16)))
    pool = pool.at[3].set(jnp.nan)  # the last page: where a wrapped -1 would land
    view = kind_view(pool, num_layers=1, kv_heads=2, tokens_per_page=4, head_dim=16)
    k, v = _normal(52, (3, 2, 16)), _normal(53, (3, 2, 16))
    pages = np.array([-1, -1, -1], np.int32)
    offsets = np.array([0, 3, 2], np.int32)
    out = write_kv(view, k, v, pages, offsets, layer=0)
    np.testing.assert_array_equal(_bits(out.reshape(pool.shape)), _bits(pool))
    jitted = jax.jit(functools.partial(write_kv, layer=0))(view, k, v, pages, offsets)
    np.testing.assert_array_equal(_bits(jitted), _bits(view))


def test_out_of_range_slots_are_dropped_under_jit():
    """Under jit values cannot be checked: bad slots are dropped, never clipped."""
    pool = jnp.asarray(_normal(54, (4, 2 * 1 * 4 * 16)))
    view = kind_view(pool, num_layers=1, kv_heads=1, tokens_per_page=4, head_dim=16)
    k, v = _normal(55, (4, 1, 16)), _normal(56, (4, 1, 16))
    pages = np.array([4, 99, 2, -5], np.int32)  # past the end, far past, bad offset, < -1
    offsets = np.array([0, 1, -1, 0], np.int32)
    out = jax.jit(functools.partial(write_kv, layer=0))(view, k, v, pages, offsets)
    np.testing.assert_array_equal(_bits(out), _bits(view))


def test_jax_wraps_negative_indices_even_with_drop():
    """Why write_kv reroutes -1 itself: mode="drop" alone writes slot -1 to the last page."""
    x = jnp.zeros((3, 2))
    y = x.at[jnp.array([-1])].set(1.0, mode="drop")
    assert np.asarray(y)[2].tolist() == [1.0, 1.0]


def test_kind_view_is_reshape_of_the_pool():
    """Two kinds share one pool; a write through one view changes exactly its slots."""
    a = dict(num_layers=2, kv_heads=2, tokens_per_page=4, head_dim=16)  # 512 elements
    b = dict(num_layers=3, kv_heads=1, tokens_per_page=4, head_dim=16)  # 384 elements
    pool = jnp.asarray(_normal(61, (3, 1536)))  # lcm(512, 384) = 1536
    view_a, view_b = kind_view(pool, **a), kind_view(pool, **b)
    assert view_a.shape == (9, 2, 4, 4, 16) and view_b.shape == (12, 3, 4, 2, 16)
    flat = np.asarray(pool).reshape(-1)
    np.testing.assert_array_equal(np.asarray(view_b).reshape(-1), flat)
    # Small page p of kind b starts at flat offset p * 384.
    np.testing.assert_array_equal(np.asarray(view_b[7]).reshape(-1), flat[7 * 384 : 8 * 384])

    layer, pages, offsets = 2, np.array([5, -1, 11], np.int32), np.array([2, 3, 0], np.int32)
    k, v = _normal(62, (3, 1, 16)), _normal(63, (3, 1, 16))
    new_pool = np.asarray(write_kv(view_b, k, v, pages, offsets, layer=layer).reshape(pool.shape))
    expected = np.zeros(flat.size, bool)
    expected_vals = flat.copy()
    for t in (0, 2):
        for c, val in enumerate((k, v)):
            start = pages[t] * 384 + ((layer * 4 + offsets[t]) * 2 + c) * 16  # kv_heads = 1
            expected[start : start + 16] = True
            expected_vals[start : start + 16] = val[t, 0]
    changed = _bits(new_pool).reshape(-1) != _bits(flat)
    np.testing.assert_array_equal(changed, expected)
    np.testing.assert_array_equal(new_pool.reshape(-1), expected_vals)
    # Kind a sees the same bytes through its own view of the new pool.
    np.testing.assert_array_equal(
        np.asarray(kind_view(jnp.asarray(new_pool), **a)).reshape(-1), expected_vals
    )


# ----------------------------------------------------------------- bad input


def _paged_case():
    pool, bt, *_ = build_pool(
        71,
        [5, 3],
        tpp=4,
        kv_heads=2,
        head_dim=16,
        num_layers=1,
        layer=0,
        dtype=jnp.float32,
        max_pages=2,
    )
    view = kind_view(pool, num_layers=1, kv_heads=2, tokens_per_page=4, head_dim=16)
    args = dict(
        q=jnp.ones((2, 1, 4, 16)),
        view=view,
        block_tables=bt,
        kv_lens=np.array([5, 3]),
        q_positions=np.array([[4], [2]]),
    )
    opts = dict(layer=0, kind="full", scale=0.25)
    return args, opts


PAGED_BAD = [
    ({}, {"kind": "local"}, "kind must be one of"),
    ({}, {"kind": "sliding"}, "needs an int window"),
    ({}, {"kind": "chunked", "chunk": 0}, "needs an int chunk"),
    ({}, {"window": 4}, "window is only for kind 'sliding'"),
    ({}, {"kind": "sliding", "window": 4, "chunk": 2}, "chunk is only for kind 'chunked'"),
    ({"q": jnp.ones((2, 1, 3, 16))}, {}, "multiple of kv_heads"),
    ({"q": jnp.ones((2, 1, 4, 8))}, {}, "q must be [batch, q_len, q_heads, 16]"),
    ({"q": jnp.ones((2, 4, 16))}, {}, "q must be"),
    ({"view": jnp.ones((4, 1, 3, 2, 4, 16))}, {}, "view must be"),
    ({"block_tables": np.zeros((2, 2), np.float32)}, {}, "integer array"),
    ({"block_tables": np.zeros((3, 2), np.int32)}, {}, "block_tables must be [2, max_pages]"),
    ({"kv_lens": np.array([5])}, {}, "kv_lens [2]"),
    ({"q_positions": np.array([[4, 4], [2, 2]])[:, :, None]}, {}, "q_positions must have 2"),
    ({"q_positions": np.array([[4, 4, 4]])}, {}, "q_positions must be [2, 1]"),
    ({}, {"layer": 1}, "layer must be an int in [0, 1)"),
    ({}, {"sinks": jnp.ones(2)}, "sinks must be a float array of shape (4,)"),
    ({}, {"soft_cap": 0.0}, "soft_cap must be > 0"),
    ({}, {"scale": None}, "scale is required"),
    ({"kv_lens": np.array([9, 3])}, {}, "kv_lens must be in [0, max_pages"),
    ({"block_tables": np.array([[0, 99], [1, -1]])}, {}, "block_tables entries"),
    ({"q_positions": np.array([[5], [2]])}, {}, "needs its own key"),
    ({"q_positions": np.array([[-2], [2]])}, {}, "q_positions must be >= 0"),
]


@pytest.mark.parametrize("arg_change,opt_change,message", PAGED_BAD)
def test_paged_attention_bad_input(arg_change, opt_change, message):
    args, opts = _paged_case()
    args.update(arg_change)
    opts.update(opt_change)
    with pytest.raises(ValueError) as err:
        paged_attention(**args, **opts)
    assert message in str(err.value)


def test_write_kv_and_dense_bad_input():
    view = jnp.zeros((4, 2, 4, 4, 16))  # [pages, layers, tpp, 2 * kv_heads, head_dim]
    k = jnp.ones((2, 2, 16))
    pages, offsets = np.array([0, 1], np.int32), np.array([0, 1], np.int32)
    cases = [
        (lambda: write_kv(view, k[:, :1], k, pages, offsets, layer=0), "k and v must both"),
        (lambda: write_kv(view, k, k, pages[:1], offsets, layer=0), "slot_pages and slot"),
        (lambda: write_kv(view, k, k, np.array([0, 4]), offsets, layer=0), "slot_pages must"),
        (lambda: write_kv(view, k, k, pages, np.array([0, 4]), layer=0), "slot_offsets of"),
        (lambda: write_kv(view, k, k, pages.astype(float), offsets, layer=0), "integer array"),
        (lambda: write_kv(view, k, k, pages, offsets, layer=2), "layer must be"),
        (lambda: write_kv(view[0], k, k, pages, offsets, layer=0), "view must be"),
    ]
    q, kk = jnp.ones((1, 2, 4, 16)), jnp.ones((1, 3, 2, 16))
    qp, kp = np.zeros((1, 2), np.int32), np.zeros((1, 3), np.int32)
    dense = functools.partial(dense_attention, kind="full", scale=1.0)
    cases += [
        (lambda: dense(q, kk, kk[:, :2], qp, kp), "k, v both"),
        (lambda: dense(jnp.ones((1, 2, 3, 16)), kk, kk, qp, kp), "multiple of kv_heads"),
        (lambda: dense(jnp.ones((2, 2, 4, 16)), kk, kk, qp, kp), "do not match q"),
        (lambda: dense(q, kk, kk, qp, kp[:, :2]), "k_positions [1, 3]"),
        (lambda: dense(q, kk, kk, qp, kp, window=3), "window is only for"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert message in str(err.value), (message, str(err.value))


def test_kind_view_bad_input():
    pool = jnp.zeros((2, 1536))
    with pytest.raises(ValueError, match="not a whole number"):
        kind_view(pool, num_layers=5, kv_heads=1, tokens_per_page=4, head_dim=16)
    with pytest.raises(ValueError, match=r"pool must be \[rows, lane\]"):
        kind_view(pool.reshape(2, 3, 512), num_layers=1, kv_heads=1, tokens_per_page=4, head_dim=16)
    with pytest.raises(ValueError, match="tokens_per_page must be a positive int"):
        kind_view(pool, num_layers=1, kv_heads=1, tokens_per_page=0, head_dim=16)
