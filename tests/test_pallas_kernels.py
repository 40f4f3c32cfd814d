"""Pallas paged-attention kernels (Triton and Mosaic) against the pure-JAX reference.

On CPU both kernels run in interpret mode: Triton's ``interpret=True`` and Mosaic's TPU
interpret mode (``pltpu.InterpretParams``: simulated HBM/VMEM, DMAs and semaphores,
uninitialized VMEM filled with NaN). Inputs are random (never zeros), pages randomly
permuted, every other page and every other layer of a used page NaN. A wider sweep
runs with JENGA_FULL_SWEEP=1.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
from jax.experimental.pallas import tpu as pltpu

from jenga_jax.device.reference_attention import dense_attention, kind_view
from jenga_jax.device.reference_attention import paged_attention as reference_paged_attention
from pallas_kernels import dispatch, mosaic_paged, rows, triton_paged
from pallas_kernels import reference as reference_with_fill

FULL_SWEEP = os.environ.get("JENGA_FULL_SWEEP") == "1"
MODULES = {"triton": triton_paged, "mosaic": mosaic_paged}
KERNELS = {name: module.paged_attention for name, module in MODULES.items()}
OPTS = {"full": {}, "sliding": {"window": 7}, "chunked": {"chunk": 6}, "cross": {}}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _normal(seed: int, shape, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale


def _round(x: np.ndarray, dtype) -> np.ndarray:
    """Round to `dtype` and back to float32 (the values the kernels really see)."""
    return np.asarray(x).astype(dtype).astype(np.float32)


# The oracle, compiled once per shape (eager op-by-op dispatch is slow in CI).
reference = jax.jit(
    reference_paged_attention,
    static_argnames=("layer", "kind", "window", "chunk", "scale", "soft_cap"),
)


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def make_case(
    seed,
    kv_lens,
    q_positions,
    *,
    q_heads=8,
    kv_heads=2,
    head_dim=16,
    tpp=4,
    max_pages=None,
    dtype=jnp.float32,
    num_layers=2,
    layer=1,
    page_fill=None,
):
    """Random K/V of each request on randomly permuted pages of one pool; the rest NaN.

    page_fill: optional [batch, max_pages] tokens per page (cross); slots past the fill
    are NaN. Returns dict(q, view, block_tables, kv_lens, q_positions, k, v, k_pos) with
    dense float32 k, v [batch, max_pages * tpp, kv_heads, head_dim] (as rounded to
    `dtype`) and k_pos [batch, S] (-1: no key) for dense_attention.
    """
    q_positions = np.asarray(q_positions, np.int32)
    batch = len(kv_lens)
    need = [math.ceil(n / tpp) for n in kv_lens]
    max_pages = max_pages or max(max(need), 1)
    seq = max_pages * tpp
    num_pages = 2 * (sum(need) + 3)  # unused (NaN) pages too
    view = np.full((num_pages, num_layers, tpp, 2 * kv_heads, head_dim), np.nan, np.float32)
    k = _round(_normal(seed, (batch, seq, kv_heads, head_dim)), dtype)
    v = _round(_normal(seed + 1, (batch, seq, kv_heads, head_dim)), dtype)
    perm = np.random.default_rng(seed + 2).permutation(num_pages)
    block_tables = np.full((batch, max_pages), -1, np.int32)
    k_pos = np.full((batch, seq), -1, np.int32)
    nxt = 0
    for b, n in enumerate(kv_lens):
        exists = np.arange(seq) < n
        if page_fill is not None:
            exists &= np.arange(seq) % tpp < np.repeat(page_fill[b], tpp)
        k[b, ~exists] = np.nan
        v[b, ~exists] = np.nan
        k_pos[b, exists] = np.arange(seq)[exists]
        for i in range(need[b]):
            block_tables[b, i] = perm[nxt]
            nxt += 1
            toks = slice(i * tpp, (i + 1) * tpp)
            view[block_tables[b, i], layer, :, :kv_heads] = k[b, toks]
            view[block_tables[b, i], layer, :, kv_heads:] = v[b, toks]
    pool = jnp.asarray(view.reshape(-1, head_dim).astype(dtype))  # [rows, lane]
    q_len = q_positions.shape[1]
    return dict(
        q=jnp.asarray(_normal(seed + 3, (batch, q_len, q_heads, head_dim))).astype(dtype),
        view=kind_view(
            pool, num_layers=num_layers, kv_heads=kv_heads, tokens_per_page=tpp, head_dim=head_dim
        ),
        block_tables=block_tables,
        kv_lens=np.asarray(kv_lens, np.int32),
        q_positions=q_positions,
        k=k,
        v=v,
        k_pos=k_pos,
    )


def chunk_positions(kv_lens, chunk_lens, q_len):
    """Each request's last `chunk_lens[b]` positions, left-aligned, -1 padded."""
    pos = np.full((len(kv_lens), q_len), -1, np.int32)
    for b, (n, c) in enumerate(zip(kv_lens, chunk_lens)):
        pos[b, :c] = np.arange(n - c, n)
    return pos


# Ragged lengths: empty, one token, mid-page, page boundary, longer (tpp 4).
KV_LENS = [0, 1, 13, 16, 23]
CHUNKS = [0, 1, 5, 3, 6]


def _args(case):
    return [case[k] for k in ("q", "view", "block_tables", "kv_lens", "q_positions")]


def _check(got, want, case, dtype):
    got32 = np.asarray(got, np.float32)
    assert got.shape == case["q"].shape and got.dtype == case["q"].dtype
    assert np.all(np.isfinite(got32))
    assert np.all(got32[np.asarray(case["q_positions"]) < 0] == 0)  # padding: exactly 0
    assert _rel_err(got, want) <= TOL[dtype]


def _kernel_opts(backend, *, q_len):
    """Small tiles, so that a few rows/pages already give several tiles and blocks."""
    if backend == "triton":
        return dict(block_rows=16, block_keys=16, num_splits=3 if q_len == 1 else 1)
    return dict(block_rows=8, pages_per_block=2)


# ----------------------------------------------------------------- kernel == reference


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize("backend", list(KERNELS))
def test_prefill_matches_reference(backend, kind, dtype):
    """Ragged prefill chunks (GQA 8:2, soft-cap, sinks), several row tiles and key blocks."""
    dtype = DTYPES[dtype]
    pos = chunk_positions(KV_LENS, CHUNKS, 6)
    if kind == "cross":  # text queries after the image keys; positions only mark padding
        pos = np.where(pos >= 0, pos + 40, -1)
    case = make_case(11, KV_LENS, pos, dtype=dtype, max_pages=7)
    opts = dict(layer=1, kind=kind, scale=0.3, soft_cap=5.0, **OPTS[kind])
    opts["sinks"] = jnp.asarray(_normal(12, (8,)))
    got = MODULES[backend].paged_prefill_attention(
        *_args(case), **opts, interpret=True, **_kernel_opts(backend, q_len=6)
    )
    _check(got, reference(*_args(case), **opts), case, dtype)


@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize("backend", list(KERNELS))
def test_decode_matches_reference(backend, kind):
    """One token per request (MQA 4:1), split-K on Triton, no soft-cap or sinks."""
    kv_lens = [1, 0, 30, 16, 9]
    pos = np.array([[n - 1] for n in kv_lens], np.int32)
    if kind == "cross":
        pos = np.where(pos >= 0, pos + 50, -1)
    case = make_case(21, kv_lens, pos, q_heads=4, kv_heads=1, tpp=4, max_pages=9)
    opts = dict(layer=1, kind=kind, scale=0.25, **OPTS[kind])
    got = MODULES[backend].paged_decode_attention(
        *_args(case), **opts, interpret=True, **_kernel_opts(backend, q_len=1)
    )
    _check(got, reference(*_args(case), **opts), case, jnp.float32)


HEAD_DIMS = [
    (64, "full", "f32"),
    (80, "cross", "bf16"),  # not a power of 2: Triton pads it with masked loads
    (128, "sliding", "bf16"),
    (256, "chunked", "f32"),
]


@pytest.mark.parametrize("head_dim,kind,dtype", HEAD_DIMS, ids=[str(h[0]) for h in HEAD_DIMS])
@pytest.mark.parametrize("backend", list(KERNELS))
def test_head_dims(backend, head_dim, kind, dtype):
    """Real head sizes, MHA (2:2), tpp 8, default tiles of each kernel."""
    dtype = DTYPES[dtype]
    kv_lens = [21, 8]
    pos = chunk_positions(kv_lens, [3, 2], 3)
    case = make_case(31, kv_lens, pos, q_heads=2, kv_heads=2, head_dim=head_dim, tpp=8, dtype=dtype)
    opts = dict(layer=1, kind=kind, scale=head_dim**-0.5, sinks=jnp.ones(2), **OPTS[kind])
    got = KERNELS[backend](*_args(case), **opts, interpret=True)
    _check(got, reference(*_args(case), **opts), case, dtype)


def _sweep_cases():
    heads = [(8, 2), (4, 1), (2, 2), (6, 3)]
    extras = [(None, False), (3.0, False), (None, True), (3.0, True)]
    yield from itertools.product(KERNELS, OPTS, DTYPES, heads, extras)


@pytest.mark.skipif(not FULL_SWEEP, reason="set JENGA_FULL_SWEEP=1")
@pytest.mark.parametrize("backend,kind,dtype,heads,extra", list(_sweep_cases()))
def test_full_sweep(backend, kind, dtype, heads, extra):
    dtype = DTYPES[dtype]
    soft_cap, use_sinks = extra
    q_heads, kv_heads = heads
    kv_lens = [0, 1, 5, 12, 27, 40]
    pos = chunk_positions(kv_lens, [0, 1, 5, 2, 9, 1], 9)
    if kind == "cross":
        pos = np.where(pos >= 0, pos + 60, -1)
    case = make_case(
        41 + q_heads,
        kv_lens,
        pos,
        q_heads=q_heads,
        kv_heads=kv_heads,
        tpp=8,
        head_dim=32,
        dtype=dtype,
        max_pages=6,
    )
    opts = dict(layer=1, kind=kind, scale=0.2, soft_cap=soft_cap, **OPTS[kind])
    opts["sinks"] = jnp.asarray(_normal(42, (q_heads,), 2.0)) if use_sinks else None
    # Prefill with small tiles (several tiles and blocks), then decode with default tiles.
    for q_len in (9, 1):
        if q_len == 1:
            case["q"] = case["q"][:, :1]
            last = np.array([[n - 1] for n in kv_lens], np.int32)
            case["q_positions"] = np.where(last >= 0, last + 60 * (kind == "cross"), -1)
        want = reference(*_args(case), **opts)
        tuning = _kernel_opts(backend, q_len=q_len) if q_len > 1 else {}
        got = KERNELS[backend](*_args(case), **opts, interpret=True, **tuning)
        _check(got, want, case, dtype)
    # Every case compiles new programs; one process once segfaulted in XLA's CPU compiler
    # after ~450 interpret-mode compilations, so drop them as we go.
    jax.clear_caches()


# ----------------------------------------------------------------- pages that are skipped


@pytest.mark.parametrize("stale_ids", [False, True], ids=["minus1", "stale"])
@pytest.mark.parametrize("kind", ["sliding", "chunked"])
@pytest.mark.parametrize("backend", list(KERNELS))
def test_released_pages_are_skipped(backend, kind, stale_ids):
    """Pages wholly before the window/chunk: -1 (or a stale id of a NaN page) and NaN."""
    kv_lens = [30, 23]
    pos = chunk_positions(kv_lens, [4, 3], 4)
    case = make_case(51, kv_lens, pos, kv_heads=2, q_heads=4, max_pages=8)
    opts = dict(layer=1, kind=kind, scale=0.5, **OPTS[kind])
    want = dense_attention(
        case["q"], case["k"], case["v"], pos, case["k_pos"], kind=kind, scale=0.5, **OPTS[kind]
    )
    # The kernels' loop bounds: the first key any row of the request sees.
    lo, hi = rows.key_bounds(jnp.asarray(pos), jnp.asarray(kv_lens), kind=kind, **OPTS[kind])
    lo_t, _ = rows.tile_key_ranges(lo, hi, 4)
    first = np.asarray(lo_t)[:, 0]
    assert np.all(first >= 2 * 4)  # at least two pages per request are never visited
    view = np.asarray(case["view"]).copy()
    bt = case["block_tables"].copy()
    nan_page = int(np.setdiff1d(np.arange(view.shape[0]), bt)[0])
    for b, f in enumerate(first):
        for i in range(f // 4):
            view[bt[b, i]] = np.nan  # released and overwritten
            bt[b, i] = nan_page if stale_ids else -1
    case.update(view=jnp.asarray(view), block_tables=bt)
    got = KERNELS[backend](*_args(case), **opts, interpret=True, **_kernel_opts(backend, q_len=4))
    _check(got, want, case, jnp.float32)


def test_tile_ranges_start_at_the_window():
    """Row bounds and tile unions (what the kernels loop over), by hand."""
    pos = jnp.array([[20, 21, 22, -1], [-1, -1, -1, -1]], jnp.int32)
    lens = jnp.array([23, 0], jnp.int32)
    for kind, opts, lo0 in [
        ("full", {}, 0),
        ("sliding", {"window": 5}, 16),
        ("chunked", {"chunk": 8}, 16),
        ("cross", {}, 0),
    ]:
        lo, hi = rows.key_bounds(pos, lens, kind=kind, **opts)
        assert int(lo[0, 0]) == lo0 and int(hi[0, 2]) == 22
        assert int(hi[0, 3]) == -1 and np.all(np.asarray(hi[1]) == -1)
        lo_t, hi_t = rows.tile_key_ranges(lo, hi, 4)
        assert (int(lo_t[0, 0]), int(hi_t[0, 0])) == (lo0, 22)
        assert (int(lo_t[1, 0]), int(hi_t[1, 0])) == (0, -1)  # empty tile


@pytest.mark.parametrize("backend", list(KERNELS))
def test_visible_key_on_missing_page_gives_nan(backend):
    """As the reference: a -1 page inside a query's range makes that query NaN."""
    case = make_case(61, [12], [[3, 7, 11, -1]], q_heads=2, kv_heads=1, max_pages=3)
    case["block_tables"][0, 1] = -1  # tokens 4..7
    opts = dict(layer=1, kind="sliding", window=4, scale=0.25)
    got = np.asarray(KERNELS[backend](*_args(case), **opts, interpret=True))
    want = np.asarray(reference(*_args(case), **opts))
    assert np.all(np.isnan(got[0, 1])) and np.all(np.isnan(want[0, 1]))
    assert np.all(got[0, 3] == 0)
    assert _rel_err(got[0, [0, 2]], want[0, [0, 2]]) <= 1e-5


def test_mosaic_dmas_race_free_and_waited(monkeypatch):
    """TPU interpret mode with the race detector: the double-buffered page DMAs never
    race with the reads of the block being computed. Control: with the DMA waits
    removed the kernel reads uninitialized (NaN) VMEM, which the test would see."""
    case = make_case(65, [13, 30], chunk_positions([13, 30], [3, 4], 4), max_pages=8)
    opts = dict(layer=1, kind="sliding", window=9, scale=0.3, pages_per_block=2, block_rows=8)
    want = reference(*_args(case), **{k: opts[k] for k in ("layer", "kind", "window", "scale")})
    params = pltpu.InterpretParams(detect_races=True)
    with pltpu.force_tpu_interpret_mode(params):  # interpret=False here: the context decides
        got = mosaic_paged.paged_attention(*_args(case), **opts)
    assert tpu_interpret.races is not None and not tpu_interpret.races.races_found
    assert _rel_err(got, want) <= 1e-5

    each = mosaic_paged._each
    monkeypatch.setattr(
        mosaic_paged, "_each", lambda method, c: None if method == "wait" else each(method, c)
    )
    try:
        bad = mosaic_paged.paged_attention(*_args(case), **opts, interpret=params)
    finally:
        mosaic_paged._paged_attention.clear_cache()
    assert np.isnan(np.asarray(bad)[1]).all()


# ----------------------------------------------------------------- cross with page_fill


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_cross_page_fill(backend):
    """Two images per request, each starting on a fresh page: partly filled pages."""
    fill = np.array([[4, 2, 4, 1, 0], [3, 4, 4, 4, 2], [0, 0, 0, 0, 0]], np.int32)
    kv_lens = [13, 18, 0]  # slots spanned: last page's index * tpp + its fill
    pos = np.array([[30, 31, -1], [40, -1, -1], [5, -1, -1]], np.int32)
    case = make_case(71, kv_lens, pos, page_fill=fill, max_pages=5)
    opts = dict(kind="cross", scale=0.3, sinks=jnp.asarray(_normal(72, (8,))))
    want = dense_attention(case["q"], case["k"], case["v"], pos, case["k_pos"], **opts)
    opts.update(layer=1, page_fill=fill)
    if backend == "reference":
        got = reference_with_fill.paged_attention(*_args(case), **opts)
    else:
        got = KERNELS[backend](*_args(case), **opts, interpret=True)
    _check(got, want, case, jnp.float32)
    # Same as the reference without fill when every page is full.
    full = make_case(73, [8, 5, 0], pos, max_pages=5)
    opts["page_fill"] = np.full((3, 5), 4, np.int32)
    interpret = {} if backend == "reference" else {"interpret": True}
    got = dispatch.paged_attention(*_args(full), **opts, backend=backend, **interpret)
    del opts["page_fill"]
    assert _rel_err(got, reference(*_args(full), **opts)) <= 1e-5


# ----------------------------------------------------------------- jit, dispatch


@pytest.mark.parametrize("backend", list(KERNELS))
def test_jit_with_traced_tables(backend):
    kv_lens = [9, 14]
    case = make_case(81, kv_lens, [[8], [13]], max_pages=4)
    opts = dict(layer=1, kind="sliding", window=6, scale=0.25, soft_cap=4.0)
    f = functools.partial(dispatch.paged_attention, **opts, backend=backend, interpret=True)
    jitted = jax.jit(f)(*_args(case))
    eager = f(*_args(case))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)
    assert _rel_err(jitted, reference(*_args(case), **opts)) <= 1e-5


@pytest.mark.parametrize("backend", list(KERNELS))
def test_kv_len_past_the_table_under_jit(backend):
    """Unchecked under jit: keys past max_pages * tpp do not exist (as in the reference)."""
    case = make_case(85, [12, 7], [[20], [3]], max_pages=3)
    case["kv_lens"] = np.array([40, 7], np.int32)  # 40 > 3 pages * 4 tokens
    opts = dict(layer=1, kind="cross", scale=0.4)
    f = functools.partial(dispatch.paged_attention, **opts, backend=backend, interpret=True)
    got = jax.jit(f)(*_args(case))
    assert _rel_err(got, reference(*_args(case), **opts)) <= 1e-5


def test_dispatch_choice_and_logging(monkeypatch, caplog):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.choose_backend() == ("reference", "platform cpu")
    monkeypatch.setenv(dispatch.ENV_VAR, "mosaic")
    assert dispatch.choose_backend() == ("mosaic", f"${dispatch.ENV_VAR}")
    assert dispatch.choose_backend("triton") == ("triton", "argument")  # argument wins
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.choose_backend()
    monkeypatch.delenv(dispatch.ENV_VAR)

    case = make_case(91, [5], [[4]], max_pages=2)
    opts = dict(layer=1, kind="full", scale=0.5)
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.INFO, logger="pallas_kernels.dispatch"):
        a = dispatch.paged_attention(*_args(case), **opts)
        b = dispatch.paged_attention(*_args(case), **opts)
    records = [r for r in caplog.records if "backend" in r.getMessage()]
    assert len(records) == 1 and "reference (platform cpu)" in records[0].getMessage()
    want = reference_paged_attention(*_args(case), **opts)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------- bad input


def _bad_case():
    case = make_case(101, [5, 3], [[4], [2]], q_heads=4, kv_heads=2, max_pages=2)
    return _args(case), dict(layer=1, kind="full", scale=0.25)


BAD = [
    ({}, {"kind": "local"}, "kind must be one of"),
    ({}, {"kind": "sliding"}, "needs an int window"),
    ({}, {"layer": 2}, "layer must be an int in [0, 2)"),
    ({0: jnp.ones((2, 1, 3, 16))}, {}, "multiple of kv_heads"),
    ({0: jnp.ones((2, 1, 4, 8))}, {}, "q must be [batch, q_len, q_heads, 16]"),
    ({3: np.array([5])}, {}, "kv_lens [2]"),
    ({3: np.array([9, 3])}, {}, "kv_lens must be in [0, max_pages"),
    ({2: np.array([[0, 99], [1, -1]])}, {}, "block_tables entries"),
    ({4: np.array([[5], [2]])}, {}, "needs its own key"),
    ({}, {"sinks": jnp.ones(2)}, "sinks must be a float array of shape (4,)"),
    ({}, {"page_fill": np.ones((2, 2), np.int32)}, "page_fill is only for kind 'cross'"),
    ({}, {"kind": "cross", "page_fill": np.ones((2, 3), np.int32)}, "page_fill must be [2, 2]"),
    ({}, {"kind": "cross", "page_fill": np.full((2, 2), 5)}, "page_fill entries must be in [0, 4]"),
]


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
@pytest.mark.parametrize("arg_change,opt_change,message", BAD)
def test_bad_input(backend, arg_change, opt_change, message):
    args, opts = _bad_case()
    for i, x in arg_change.items():
        args[i] = x
    opts.update(opt_change)
    with pytest.raises(ValueError) as err:
        dispatch.paged_attention(*args, **opts, backend=backend)
    assert message in str(err.value)


KERNEL_BAD = [
    ("triton", {"block_rows": 24}, "block_rows must be a power of 2"),
    ("triton", {"block_rows": 8}, "block_rows must be an int >= 16"),
    ("triton", {"block_keys": 100}, "block_keys must be a power of 2"),
    ("triton", {"num_splits": 0}, "num_splits must be an int >= 1"),
    ("mosaic", {"block_rows": 12}, "block_rows must be a multiple of 8"),
    ("mosaic", {"pages_per_block": 0}, "pages_per_block must be an int >= 1"),
    ("reference", {"block_rows": 16}, "takes no interpret or tuning"),
]


@pytest.mark.parametrize("backend,change,message", KERNEL_BAD)
def test_bad_kernel_options(backend, change, message):
    args, opts = _bad_case()
    opts.update(change)
    with pytest.raises(ValueError) as err:
        dispatch.paged_attention(*args, **opts, backend=backend)
    assert message in str(err.value)


def test_bad_decode_and_traced_scale():
    args, opts = _bad_case()
    args[0] = jnp.ones((2, 2, 4, 16))
    for module in (triton_paged, mosaic_paged):
        with pytest.raises(ValueError, match="decode attention needs q"):
            module.paged_decode_attention(*args, **opts)
    args, opts = _bad_case()
    with pytest.raises(ValueError, match="scale must be a static Python float"):
        jax.jit(lambda s: triton_paged.paged_attention(*args, **{**opts, "scale": s}))(0.5)
    with pytest.raises(ValueError, match="soft_cap must be a static Python float"):
        jax.jit(lambda c: mosaic_paged.paged_attention(*args, **{**opts, "soft_cap": c}))(3.0)


# ----------------------------------------------------------------- compiled, on device


def _platform_has(name):
    try:
        return bool(jax.devices(name))
    except RuntimeError:
        return False


@pytest.mark.skipif(not _platform_has("gpu"), reason="needs a GPU")
@pytest.mark.parametrize("kind", list(OPTS))
def test_triton_compiled_on_gpu(kind):  # pragma: no cover - GPU only
    kv_lens = [0, 1, 37, 64, 200]
    pos = chunk_positions(kv_lens, [0, 1, 5, 16, 3], 16)
    for dtype in (jnp.float32, jnp.bfloat16):
        case = make_case(111, kv_lens, pos, head_dim=128, tpp=16, dtype=dtype)
        opts = dict(layer=1, kind=kind, scale=0.1, soft_cap=20.0, sinks=jnp.ones(8), **OPTS[kind])
        for q_len in (16, 1):
            args = _args(case)
            if q_len == 1:
                args[0] = args[0][:, :1]
                args[4] = np.maximum(np.array(kv_lens)[:, None] - 1, -1).astype(np.int32)
            got = triton_paged.paged_attention(*args, **opts)
            _check(got, reference(*args, **opts), dict(q=args[0], q_positions=args[4]), dtype)


@pytest.mark.skipif(not _platform_has("tpu"), reason="needs a TPU")
@pytest.mark.parametrize("kind", list(OPTS))
def test_mosaic_compiled_on_tpu(kind):  # pragma: no cover - TPU only
    kv_lens = [0, 1, 37, 64, 200]
    pos = chunk_positions(kv_lens, [0, 1, 5, 16, 3], 16)
    case = make_case(121, kv_lens, pos, head_dim=128, tpp=16, dtype=jnp.bfloat16)
    opts = dict(layer=1, kind=kind, scale=0.1, soft_cap=20.0, sinks=jnp.ones(8), **OPTS[kind])
    got = mosaic_paged.paged_attention(*_args(case), **opts)
    _check(got, reference(*_args(case), **opts), case, jnp.bfloat16)


def test_wide_heads_fall_back_to_the_reference_on_tpu(monkeypatch):
    """head_dim 256: the Mosaic kernel does not compile for it yet, so a platform (or
    environment) choice of Mosaic runs the reference; forcing Mosaic raises."""
    case = make_case(92, [5, 9], [[4], [8]], head_dim=256, max_pages=3)
    opts = dict(layer=1, kind="full", scale=0.5)
    monkeypatch.setenv(dispatch.ENV_VAR, "mosaic")
    got = dispatch.paged_attention(*_args(case), **opts)
    want = reference_paged_attention(*_args(case), **opts)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="does not compile for head_dim 256"):
        dispatch.paged_attention(*_args(case), backend="mosaic", **opts)
