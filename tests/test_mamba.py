"""The Mamba mixer against a float64 numpy loop, chunking, padding, and state pages."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jenga_jax.device.mamba import (
    MambaParams,
    init_mamba_params,
    mamba_forward,
    mamba_forward_batch,
    read_state,
    state_layer_elems,
    state_page_elems,
    state_view,
    write_state,
    zero_state,
)
from jenga_jax.device.reference_attention import kind_view, write_kv

D_MODEL, D_INNER, D_STATE, D_CONV, DT_RANK = 16, 32, 4, 4, 4
DIMS = dict(d_inner=D_INNER, d_state=D_STATE, d_conv=D_CONV)

fwd = jax.jit(mamba_forward)
fwd_batch = jax.jit(mamba_forward_batch)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _params(seed: int, *, inner_layernorms: bool) -> MambaParams:
    """Init weights, with D, the norm weights and dt biases made random (never 0 or 1)."""
    p = init_mamba_params(
        jax.random.key(seed),
        d_model=D_MODEL,
        d_inner=D_INNER,
        d_state=D_STATE,
        d_conv=D_CONV,
        dt_rank=DT_RANK,
        inner_layernorms=inner_layernorms,
        dtype=jnp.float32,
    )
    rng = _rng(seed)
    extra = dict(D=rng.normal(size=D_INNER), dt_proj_b=rng.normal(-1.0, 1.0, size=D_INNER))
    if inner_layernorms:
        extra.update(
            dt_norm=1 + 0.3 * rng.normal(size=DT_RANK),
            b_norm=1 + 0.3 * rng.normal(size=D_STATE),
            c_norm=1 + 0.3 * rng.normal(size=D_STATE),
        )
    extra = {k: jnp.asarray(v, jnp.float32) for k, v in extra.items()}
    return dataclasses.replace(p, **extra, norm_eps=1e-5)


def _state(seed: int, batch: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(seed)
    conv = rng.normal(size=(*batch, D_CONV - 1, D_INNER)).astype(np.float32)
    ssm = rng.normal(size=(*batch, D_INNER, D_STATE)).astype(np.float32)
    return conv, ssm


def _x(seed: int, shape) -> np.ndarray:
    return _rng(seed).normal(size=shape).astype(np.float32)


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _close(got, want, tol: float = 1e-5) -> None:
    assert np.asarray(got).shape == np.asarray(want).shape
    assert _rel_err(got, want) <= tol


def _bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint32)


# --------------------------------------------------------------------------- numpy oracle


def _silu(v):
    return v / (1 + np.exp(-v))


def _np_forward(params: MambaParams, x, conv_state, ssm_state):
    """Token by token in float64, every sum written out."""
    p = {
        f.name: np.asarray(getattr(params, f.name), np.float64)
        for f in dataclasses.fields(params)
        if f.name != "norm_eps" and getattr(params, f.name) is not None
    }
    x = np.asarray(x, np.float64)
    t_len, d_inner = x.shape[0], p["D"].shape[0]
    k_taps, n, r = p["conv_w"].shape[1], p["A_log"].shape[1], p["dt_proj_w"].shape[0]
    xz = x @ p["in_proj"]
    xs, z = xz[:, :d_inner], xz[:, d_inner:]
    inputs = [row for row in np.asarray(conv_state, np.float64)] + [row for row in xs]
    h = np.array(ssm_state, np.float64)
    a = -np.exp(p["A_log"])

    def rms(v, w):
        return v / np.sqrt(np.mean(v * v) + params.norm_eps) * w

    ys = []
    for t in range(t_len):
        conv = p["conv_b"].copy()
        for k in range(k_taps):  # inputs[t + k_taps - 1] is token t
            conv += p["conv_w"][:, k] * inputs[t + k]
        xc = _silu(conv)
        dbc = xc @ p["x_proj"]
        dt, b, c = dbc[:r], dbc[r : r + n], dbc[r + n :]
        if params.inner_layernorms:
            dt, b, c = rms(dt, p["dt_norm"]), rms(b, p["b_norm"]), rms(c, p["c_norm"])
        dt = np.log1p(np.exp(dt @ p["dt_proj_w"] + p["dt_proj_b"]))
        y = np.zeros(d_inner)
        for i in range(d_inner):
            for s in range(n):
                h[i, s] = np.exp(dt[i] * a[i, s]) * h[i, s] + dt[i] * b[s] * xc[i]
                y[i] += h[i, s] * c[s]
        y = (y + p["D"] * xc) * _silu(z[t])
        ys.append(y @ p["out_proj"])
    return np.stack(ys), np.array(inputs[t_len:]).reshape(k_taps - 1, d_inner), h


# --------------------------------------------------------------------------- 1. oracle


@pytest.mark.parametrize("inner_layernorms", [False, True])
@pytest.mark.parametrize("start", ["zero", "random"])
def test_forward_matches_numpy(inner_layernorms, start):
    params = _params(1, inner_layernorms=inner_layernorms)
    x = _x(2, (37, D_MODEL))
    conv0, ssm0 = zero_state(params) if start == "zero" else _state(3)
    y, conv, ssm = fwd(params, x, conv0, ssm0)
    y_np, conv_np, ssm_np = _np_forward(params, x, conv0, ssm0)
    assert y.dtype == jnp.float32 and conv.dtype == ssm.dtype == jnp.float32
    _close(y, y_np)
    _close(conv, conv_np)
    _close(ssm, ssm_np)


def test_bf16_params_and_input():
    """Computed in float32 from bf16 weights; output in x.dtype, states float32."""
    params = _params(4, inner_layernorms=True)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    x = jnp.asarray(_x(5, (9, D_MODEL)), jnp.bfloat16)
    conv0, ssm0 = _state(6)
    y, conv, ssm = fwd(p16, x, conv0, ssm0)
    assert y.dtype == jnp.bfloat16 and conv.dtype == ssm.dtype == jnp.float32
    y_np, conv_np, ssm_np = _np_forward(p16, x.astype(jnp.float32), conv0, ssm0)
    _close(y.astype(jnp.float32), y_np, 1e-2)
    _close(ssm, ssm_np)


# --------------------------------------------------------------------------- 2. chunks


@pytest.mark.parametrize("inner_layernorms", [False, True])
def test_chunked_prefill_and_decode(inner_layernorms):
    params = _params(7, inner_layernorms=inner_layernorms)
    x = _x(8, (37, D_MODEL))
    y_full, conv_full, ssm_full = fwd(params, x, *zero_state(params))

    state, ys, start = zero_state(params), [], 0
    for size in (5, 1, 16, 15):
        y, *state = fwd(params, x[start : start + size], *state)
        ys.append(y)
        start += size
    _close(np.concatenate(ys), y_full)
    _close(state[0], conv_full)
    _close(state[1], ssm_full)

    y, *state = fwd(params, x[:20], *zero_state(params))
    ys = [y]
    for t in range(20, 37):
        y, *state = fwd(params, x[t : t + 1], *state)
        ys.append(y)
    _close(np.concatenate(ys), y_full)
    _close(state[0], conv_full)
    _close(state[1], ssm_full)


# --------------------------------------------------------------------------- 3. padding


def test_valid_len_padding():
    params = _params(9, inner_layernorms=True)
    conv0, ssm0 = _state(10)
    x = _x(11, (16, D_MODEL))
    x[11:] = np.nan  # padding may hold anything
    y11, conv11, ssm11 = fwd(params, x[:11], conv0, ssm0)
    y, conv, ssm = fwd(params, x, conv0, ssm0, valid_len=jnp.int32(11))  # traced valid_len
    assert np.all(np.isfinite(np.asarray(y)))
    _close(y[:11], y11, 1e-6)
    _close(conv, conv11, 1e-6)
    _close(ssm, ssm11, 1e-6)
    # valid_len 0: the state is unchanged, bit for bit
    _, conv, ssm = fwd(params, x, conv0, ssm0, valid_len=0)
    np.testing.assert_array_equal(_bits(conv), _bits(conv0))
    np.testing.assert_array_equal(_bits(ssm), _bits(ssm0))


def test_batch_matches_single():
    params = _params(12, inner_layernorms=False)
    lens = np.array([16, 11, 0, 1], np.int32)
    conv0, ssm0 = _state(13, (4,))
    x = _x(14, (4, 16, D_MODEL))
    y, conv, ssm = fwd_batch(params, x, conv0, ssm0, valid_lens=lens)
    assert y.shape == (4, 16, D_MODEL) and conv.shape == conv0.shape and ssm.shape == ssm0.shape
    for i, n in enumerate(lens):
        yi, ci, si = fwd(params, x[i, :n], conv0[i], ssm0[i])
        if n:
            _close(y[i, :n], yi, 1e-6)
        _close(conv[i], ci, 1e-6)
        _close(ssm[i], si, 1e-6)
    y_all, *_ = fwd_batch(params, x, conv0, ssm0)  # default: every row valid
    _close(y_all[0], y[0], 1e-6)


# --------------------------------------------------------------------------- 4. pages

# Attention kind: 2 layers x 4 tokens x 2 (K/V) x 2 kv_heads x 8 head_dim = 256 elements.
# State kind: 2 layers x (3 x 32 + 32 x 4) = 448 elements. Large page: lcm = 1792.
# The pool is [rows, lane] with lane = the head dim, 8: a state (224) is 28 rows.
ATTN = dict(num_layers=2, kv_heads=2, tokens_per_page=4, head_dim=8)
LPP = 2
LARGE = 1792


def _pool(seed: int) -> jax.Array:
    return jnp.asarray(_x(seed, (3 * LARGE // 8, 8)))  # [rows, lane]


def test_state_page_sizes():
    assert state_layer_elems(**DIMS) == 224
    assert state_page_elems(layers_per_page=LPP, **DIMS) == 448
    view = state_view(_pool(0), layers_per_page=LPP, **DIMS)
    assert view.shape == (12, 56, 8)  # [pages, rows, lane]: the pool's rows kept
    flat = state_view(_pool(0).reshape(-1, 64), layers_per_page=LPP, **DIMS)
    assert flat.shape == (12, 448)  # a state is not whole rows of 64: flat pages


def test_state_pages_round_trip_shared_pool():
    pool = _pool(20)
    page_elems, per_layer = state_page_elems(layers_per_page=LPP, **DIMS), 224
    view = state_view(pool, layers_per_page=LPP, **DIMS)
    conv, ssm = _state(21)
    view2 = write_state(view, 5, 1, conv, ssm)
    c, s = read_state(view2, 5, 1, **DIMS)
    np.testing.assert_array_equal(_bits(c), _bits(conv))
    np.testing.assert_array_equal(_bits(s), _bits(ssm))
    # exactly the written elements of the pool changed
    flat_old, flat_new = _bits(pool).ravel(), _bits(view2.reshape(pool.shape)).ravel()
    lo = 5 * page_elems + 1 * per_layer
    written = np.zeros(flat_old.size, bool)
    written[lo : lo + per_layer] = True
    np.testing.assert_array_equal(flat_new[~written], flat_old[~written])
    # the attention kind sees the new bits in its own pages (same buffer, no copy)
    attn_old = kind_view(pool, **ATTN)
    attn_new = kind_view(view2.reshape(pool.shape), **ATTN)
    touched = {lo // 256, (lo + per_layer - 1) // 256}
    for p in range(attn_old.shape[0]):
        same = np.array_equal(_bits(attn_old[p]), _bits(attn_new[p]))
        assert same == (p not in touched)
    # an attention write leaves state pages it does not overlap untouched
    k = _x(22, (1, 2, 8))
    attn3 = write_kv(attn_new, k, -k, np.array([0]), np.array([1]), layer=0)
    view3 = state_view(attn3.reshape(pool.shape), layers_per_page=LPP, **DIMS)
    for p in range(1, view3.shape[0]):  # attention page 0 lies inside state page 0
        np.testing.assert_array_equal(_bits(view3[p]), _bits(view2[p]))


def test_state_pages_batched_pages():
    view = state_view(_pool(30), layers_per_page=LPP, **DIMS)
    conv, ssm = _state(31, (3,))
    pages = np.array([3, -1, 11], np.int32)
    view2 = write_state(view, pages, 0, conv, ssm)
    c, s = read_state(view2, pages, 0, **DIMS)
    for i in (0, 2):
        np.testing.assert_array_equal(_bits(c[i]), _bits(conv[i]))
        np.testing.assert_array_equal(_bits(s[i]), _bits(ssm[i]))
    assert not np.any(np.asarray(c[1])) and not np.any(np.asarray(s[1]))
    untouched = [p for p in range(view.shape[0]) if p not in (3, 11)]
    untouched = np.array(untouched)
    np.testing.assert_array_equal(_bits(view2[untouched]), _bits(view[untouched]))
    np.testing.assert_array_equal(_bits(view2[:, 28:]), _bits(view[:, 28:]))  # layer 1


def test_page_minus_one_reads_zeros_writes_nothing():
    pool = _pool(40)
    view = state_view(pool, layers_per_page=LPP, **DIMS)
    conv, ssm = _state(41)
    read = jax.jit(lambda v, p: read_state(v, p, 1, **DIMS))
    write = jax.jit(lambda v, p, c, s: write_state(v, p, 1, c, s))
    for rd, wr in ((lambda v, p: read_state(v, p, 1, **DIMS), None), (read, write)):
        c, s = rd(view, -1)
        assert c.shape == (D_CONV - 1, D_INNER) and s.shape == (D_INNER, D_STATE)
        assert not np.any(np.asarray(c)) and not np.any(np.asarray(s))
        wr = wr or (lambda v, p, c, s: write_state(v, p, 1, c, s))
        np.testing.assert_array_equal(_bits(wr(view, -1, conv, ssm)), _bits(view))
    # traced ids out of range are dropped / read as zeros, never wrapped or clipped
    for bad in (-2, view.shape[0], -view.shape[0]):
        np.testing.assert_array_equal(_bits(write(view, bad, conv, ssm)), _bits(view))
        assert not np.any(np.asarray(read(view, bad)[1]))


def test_paged_step_under_jit():
    """read -> forward -> write with traced pages: a new request (-1 in) and a dropped write."""
    params = _params(50, inner_layernorms=True)
    view = state_view(_pool(51), layers_per_page=LPP, **DIMS)
    x = _x(52, (6, D_MODEL))

    @jax.jit
    def step(view, x, page_in, page_out):
        conv, ssm = read_state(view, page_in, 0, **DIMS)
        y, conv, ssm = mamba_forward(params, x, conv, ssm)
        return y, write_state(view, page_out, 0, conv, ssm)

    y, view2 = step(view, x, -1, 7)
    y_ref, conv_ref, ssm_ref = fwd(params, x, *zero_state(params))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    c, s = read_state(view2, 7, 0, **DIMS)
    np.testing.assert_array_equal(_bits(c), _bits(conv_ref))
    np.testing.assert_array_equal(_bits(s), _bits(ssm_ref))
    y, view3 = step(view2, x, 7, -1)
    np.testing.assert_array_equal(_bits(view3), _bits(view2))
    _close(y, fwd(params, x, conv_ref, ssm_ref)[0], 1e-6)


# --------------------------------------------------------------------------- 5. errors


def test_bad_inputs():
    params = _params(60, inner_layernorms=False)
    conv, ssm = _state(61)
    x = _x(62, (5, D_MODEL))
    view = state_view(_pool(63), layers_per_page=LPP, **DIMS)
    cases = [
        lambda: mamba_forward(params, x[:, :-1], conv, ssm),
        lambda: mamba_forward(params, x[0], conv, ssm),
        lambda: mamba_forward(params, x.astype(np.int32), conv, ssm),
        lambda: mamba_forward(params, x, conv[:-1], ssm),
        lambda: mamba_forward(params, x, conv, ssm.T),
        lambda: mamba_forward(params, x, conv, ssm, valid_len=6),
        lambda: mamba_forward(params, x, conv, ssm, valid_len=-1),
        lambda: mamba_forward(params, x, conv, ssm, valid_len=2.0),
        lambda: mamba_forward(dataclasses.replace(params, D=params.D[:-1]), x, conv, ssm),
        lambda: mamba_forward(dataclasses.replace(params, dt_norm=jnp.ones(4)), x, conv, ssm),
        lambda: mamba_forward_batch(params, x[None], conv, ssm[None]),
        lambda: mamba_forward_batch(params, x[None], conv[None], ssm[None], valid_lens=[5, 5]),
        lambda: mamba_forward_batch(params, x[None], conv[None], ssm[None], valid_lens=[9]),
        lambda: state_view(jnp.zeros((3, LARGE + 1)), layers_per_page=LPP, **DIMS),
        lambda: state_view(jnp.zeros((3, LARGE), jnp.int32), layers_per_page=LPP, **DIMS),
        lambda: state_view(jnp.zeros((LARGE,)), layers_per_page=LPP, **DIMS),
        lambda: state_view(jnp.zeros((3, LARGE)), layers_per_page=0, **DIMS),
        lambda: state_view(jnp.zeros((3, LARGE)), layers_per_page=2, page_elems=400, **DIMS),
        lambda: read_state(view, 12, 0, **DIMS),
        lambda: read_state(view, -2, 0, **DIMS),
        lambda: read_state(view, 0, 2, **DIMS),
        lambda: read_state(view, 0.0, 0, **DIMS),
        lambda: read_state(view[0], 0, 0, **DIMS),
        lambda: write_state(view, 12, 0, conv, ssm),
        lambda: write_state(view, 0, 0, conv[:-1, :-1], ssm),
        lambda: write_state(view, np.array([1, 1]), 0, np.stack([conv] * 2), np.stack([ssm] * 2)),
        lambda: write_state(view, np.array([1, 2]), 0, conv, ssm),
    ]
    for i, case in enumerate(cases):
        try:
            case()
        except ValueError:
            continue
        pytest.fail(f"case {i} did not raise ValueError")
    with pytest.raises(TypeError):
        mamba_forward(dataclasses.asdict(params), x, conv, ssm)
    for bad in (dict(d_conv=0), dict(dt_rank=1.5)):
        kw = dict(d_model=4, d_inner=8, d_state=2, d_conv=2, dt_rank=2, inner_layernorms=False)
        with pytest.raises(ValueError):
            init_mamba_params(jax.random.key(0), **{**kw, **bad})
