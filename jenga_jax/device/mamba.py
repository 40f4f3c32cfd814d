"""The Mamba-1 mixer of Jamba as pure functions, its state living in KV-pool pages.

Math (per request, token ``t``; ``K = d_conv``, ``N = d_state``, ``R = dt_rank``)::

    xs, z   = split(x_t @ in_proj)                      # [d_inner] each (x, then gate)
    xc      = silu(b + sum_k conv_w[:, k] * xs_{t-K+1+k})  # depthwise causal conv
    dt, B, C = split(xc @ x_proj)                        # [R], [N], [N]
    dt, B, C = rms(dt), rms(B), rms(C)                   # only with inner layernorms
    dt      = softplus(dt @ dt_proj_w + dt_proj_b)       # [d_inner]
    h       = exp(dt * A) * h + (dt * xc) B              # [d_inner, N], A = -exp(A_log)
    y_t     = ((h @ C) + D * xc) * silu(z) @ out_proj    # [d_model]

The per-request state after token ``t`` is ``conv_state`` [K - 1, d_inner] (the conv
inputs ``xs`` of the last K - 1 tokens, oldest first) and ``ssm_state`` [d_inner, N]
(``h``). States are always float32 (like the ``ssm_states`` of Hugging Face's cache);
all arithmetic is float32 whatever the parameters' dtype, and the output is cast to
``x.dtype``. Zero states are the start of a sequence.

A state kind's small page holds ``layers_per_page`` layers' states, one after the
other, each ``(K - 1) * d_inner`` conv elements then ``d_inner * N`` ssm ones (both
row-major): layer ``l`` at elements ``[l * per_layer, (l + 1) * per_layer)`` of the page.
Small page ``p`` is at flat offset ``p * page_elems`` of the pool ``[rows, lane]``, the
same convention as :func:`jenga_jax.device.reference_attention.kind_view`. The view
(:func:`state_view`) keeps the pool's rows when a layer's state is whole rows::

    view[page, row, lane]   # layer l: rows [l * per_layer / lane, (l + 1) * per_layer / lane)

(a bitcast under TPU tiling too), else it is flat, ``view[page, elem]``. A page may
hold more elements than its layers' states (the paged and uniform baselines round
state pages up to their page size; the TPU alignment rounds them to whole tiles): the
tail is never read or written. Page ``-1`` means "no page": :func:`read_state` reads a
zero state and :func:`write_state` writes nothing.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jenga_jax.device.inplace import scatter_set

_HIGHEST = jax.lax.Precision.HIGHEST
_F32 = jnp.float32


# --------------------------------------------------------------------------- params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MambaParams:
    """One Mamba layer's weights (a pytree; ``norm_eps`` is static).

    in_proj [d_model, 2 * d_inner]     columns: x, then the gate z
    conv_w [d_inner, d_conv]           depthwise causal conv, last tap = current token
    conv_b [d_inner]
    x_proj [d_inner, dt_rank + 2 * d_state]   columns: dt, B, C
    dt_proj_w [dt_rank, d_inner]
    dt_proj_b [d_inner]
    A_log [d_inner, d_state]           A = -exp(A_log)
    D [d_inner]
    out_proj [d_inner, d_model]
    dt_norm [dt_rank], b_norm [d_state], c_norm [d_state]: RMSNorm weights, all three
    or none (Jamba's inner layernorms); norm_eps their epsilon.
    """

    in_proj: jax.Array
    conv_w: jax.Array
    conv_b: jax.Array
    x_proj: jax.Array
    dt_proj_w: jax.Array
    dt_proj_b: jax.Array
    A_log: jax.Array
    D: jax.Array
    out_proj: jax.Array
    dt_norm: jax.Array | None = None
    b_norm: jax.Array | None = None
    c_norm: jax.Array | None = None
    norm_eps: float = dataclasses.field(default=1e-6, metadata=dict(static=True))

    @property
    def inner_layernorms(self) -> bool:
        return self.dt_norm is not None


@dataclasses.dataclass(frozen=True)
class _Dims:
    d_model: int
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int


def _check_params(params) -> _Dims:
    """Validate every weight's shape against the others; returns the dimensions."""
    if not isinstance(params, MambaParams):
        raise TypeError(f"params must be MambaParams, got {type(params).__name__}")
    shapes = {
        f.name: getattr(params, f.name).shape
        for f in dataclasses.fields(params)
        if f.name != "norm_eps" and getattr(params, f.name) is not None
    }
    for name in shapes:
        if not jnp.issubdtype(getattr(params, name).dtype, jnp.floating):
            raise ValueError(f"params.{name} must be floating, got {getattr(params, name).dtype}")
    ip, cw, xp, al = shapes["in_proj"], shapes["conv_w"], shapes["x_proj"], shapes["A_log"]
    if len(ip) != 2 or ip[1] % 2 or len(cw) != 2 or len(al) != 2 or len(xp) != 2:
        raise ValueError(
            "in_proj must be [d_model, 2 * d_inner], conv_w [d_inner, d_conv], "
            f"A_log [d_inner, d_state], x_proj [d_inner, dt_rank + 2 * d_state]; got "
            f"{ip}, {cw}, {al}, {xp}"
        )
    d_model, d_inner = ip[0], ip[1] // 2
    d_conv, d_state = cw[1], al[1]
    dims = _Dims(d_model, d_inner, d_state, d_conv, xp[1] - 2 * d_state)
    if min(dataclasses.astuple(dims)) < 1:
        raise ValueError(f"every dimension must be >= 1, got {dims} from shapes {shapes}")
    n, r = d_state, dims.dt_rank
    want = {
        "in_proj": (d_model, 2 * d_inner),
        "conv_w": (d_inner, d_conv),
        "conv_b": (d_inner,),
        "x_proj": (d_inner, r + 2 * n),
        "dt_proj_w": (r, d_inner),
        "dt_proj_b": (d_inner,),
        "A_log": (d_inner, n),
        "D": (d_inner,),
        "out_proj": (d_inner, d_model),
    }
    norms = {"dt_norm": (r,), "b_norm": (n,), "c_norm": (n,)}
    present = [k for k in norms if k in shapes]
    if present and len(present) != 3:
        raise ValueError(f"dt_norm, b_norm and c_norm go together, got only {present}")
    if present:
        want.update(norms)
    bad = {k: (shapes[k], w) for k, w in want.items() if shapes[k] != w}
    if bad:
        detail = ", ".join(f"{k} {got} (want {w})" for k, (got, w) in bad.items())
        raise ValueError(f"inconsistent Mamba params for {dims}: {detail}")
    return dims


def _check_pos_int(**dims) -> None:
    for name, d in dims.items():
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            raise ValueError(f"{name} must be a positive int, got {d!r}")


def init_mamba_params(
    key,
    *,
    d_model: int,
    d_inner: int,
    d_state: int,
    d_conv: int,
    dt_rank: int,
    inner_layernorms: bool,
    dtype=jnp.float32,
    norm_eps: float = 1e-6,
    dt_min: float = 1e-3,
    dt_max: float = 1e-1,
) -> MambaParams:
    """Random weights in the spirit of Mamba's init (all cast to ``dtype``).

    Projections ~ N(0, 1 / fan_in); conv and dt_proj_w uniform(+-1/sqrt(fan_in));
    dt_proj_b the inverse softplus of dt log-uniform in [dt_min, dt_max];
    A_log = log(1..d_state) on every channel; D = 1; norm weights = 1.
    """
    _check_pos_int(d_model=d_model, d_inner=d_inner, d_state=d_state, d_conv=d_conv)
    _check_pos_int(dt_rank=dt_rank)
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    ks = jax.random.split(key, 7)

    def normal(k, shape, fan_in):
        return jax.random.normal(k, shape, _F32) * fan_in**-0.5

    def uniform(k, shape, bound):
        return jax.random.uniform(k, shape, _F32, -bound, bound)

    conv_bound = d_conv**-0.5
    log_dt = jax.random.uniform(ks[5], (d_inner,), _F32, math.log(dt_min), math.log(dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), 1e-4)
    a_log = jnp.log(jnp.arange(1, d_state + 1, dtype=_F32))
    params = dict(
        in_proj=normal(ks[0], (d_model, 2 * d_inner), d_model),
        conv_w=uniform(ks[1], (d_inner, d_conv), conv_bound),
        conv_b=uniform(ks[2], (d_inner,), conv_bound),
        x_proj=normal(ks[3], (d_inner, dt_rank + 2 * d_state), d_inner),
        dt_proj_w=uniform(ks[4], (dt_rank, d_inner), dt_rank**-0.5),
        dt_proj_b=dt + jnp.log(-jnp.expm1(-dt)),  # softplus(dt_proj_b) == dt
        A_log=jnp.broadcast_to(a_log, (d_inner, d_state)),
        D=jnp.ones((d_inner,), _F32),
        out_proj=normal(ks[6], (d_inner, d_model), d_inner),
    )
    if inner_layernorms:
        params.update(
            dt_norm=jnp.ones((dt_rank,), _F32),
            b_norm=jnp.ones((d_state,), _F32),
            c_norm=jnp.ones((d_state,), _F32),
        )
    params = {k: v.astype(dtype) for k, v in params.items()}
    return MambaParams(**params, norm_eps=float(norm_eps))


def zero_state(params: MambaParams) -> tuple[jax.Array, jax.Array]:
    """The start-of-sequence state: (conv_state [d_conv - 1, d_inner], ssm_state
    [d_inner, d_state]), float32 zeros."""
    d = _check_params(params)
    return jnp.zeros((d.d_conv - 1, d.d_inner), _F32), jnp.zeros((d.d_inner, d.d_state), _F32)


# --------------------------------------------------------------------------- forward


def _traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _mm(a, b):
    return jnp.matmul(a, b.astype(_F32), precision=_HIGHEST)


def _rms(x, w, eps):
    """Jamba's RMSNorm over the last axis (float32)."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(_F32)


def _float_array(name: str, x, shape: tuple[int, ...]) -> jax.Array:
    x = jnp.asarray(x)
    if x.shape != shape or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array of shape {shape}, got {x.dtype} {x.shape}")
    return x


def _lengths(name: str, n, shape: tuple[int, ...], t: int) -> jax.Array:
    """Valid lengths as int32 of `shape`, checked in [0, t] when concrete, else clipped."""
    n = jnp.asarray(n)
    if not jnp.issubdtype(n.dtype, jnp.integer) or n.shape != shape:
        raise ValueError(
            f"{name} must be an integer array of shape {shape}, got {n.dtype} {n.shape}"
        )
    if not _traced(n) and np.any((np.asarray(n) < 0) | (np.asarray(n) > t)):
        raise ValueError(f"{name} must be in [0, {t}] (the chunk length), got {np.asarray(n)}")
    return jnp.clip(n.astype(jnp.int32), 0, t)


def mamba_forward(params: MambaParams, x, conv_state, ssm_state, *, valid_len=None):
    """One request's chunk of tokens through the mixer, continuing from a state.

    x [T, d_model]; conv_state [d_conv - 1, d_inner]; ssm_state [d_inner, d_state] (any
    float dtype, computed in float32). valid_len: int or int scalar (may be traced),
    default T; only the first valid_len tokens update the state, the rest are padding
    (their inputs are ignored and their output rows are finite garbage). Concrete values
    outside [0, T] raise; traced ones are clipped.

    Returns (y [T, d_model] in x.dtype, conv_state, ssm_state) with the states (float32)
    after token valid_len - 1 (unchanged for valid_len 0).
    """
    d = _check_params(params)
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[1] != d.d_model or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float array [T, {d.d_model}], got {x.dtype} {x.shape}")
    t_len, k = x.shape[0], d.d_conv
    conv_state = _float_array("conv_state", conv_state, (k - 1, d.d_inner)).astype(_F32)
    ssm_state = _float_array("ssm_state", ssm_state, (d.d_inner, d.d_state)).astype(_F32)
    n = _lengths("valid_len", t_len if valid_len is None else valid_len, (), t_len)

    real = jnp.arange(t_len) < n  # [T]
    xf = jnp.where(real[:, None], x.astype(_F32), 0.0)  # padding may hold anything (NaN)
    xz = _mm(xf, params.in_proj)  # [T, 2 * d_inner]
    xs, z = xz[:, : d.d_inner], xz[:, d.d_inner :]

    # Causal depthwise conv over the previous K - 1 inputs and this chunk's.
    window = jnp.concatenate([conv_state, xs], axis=0)  # [K - 1 + T, d_inner]
    conv_w = params.conv_w.astype(_F32)
    conv = params.conv_b.astype(_F32) + sum(window[j : j + t_len] * conv_w[:, j] for j in range(k))
    new_conv_state = jax.lax.dynamic_slice_in_dim(window, n, k - 1, axis=0)
    xc = jax.nn.silu(conv)  # [T, d_inner]

    dbc = _mm(xc, params.x_proj)  # [T, dt_rank + 2 * d_state]
    r, ns = d.dt_rank, d.d_state
    dt, b, c = dbc[:, :r], dbc[:, r : r + ns], dbc[:, r + ns :]
    if params.inner_layernorms:
        eps = params.norm_eps
        dt, b, c = (
            _rms(dt, params.dt_norm, eps),
            _rms(b, params.b_norm, eps),
            _rms(c, params.c_norm, eps),
        )
    dt = jax.nn.softplus(_mm(dt, params.dt_proj_w) + params.dt_proj_b.astype(_F32))  # [T, d_inner]
    a = -jnp.exp(params.A_log.astype(_F32))  # [d_inner, d_state]

    def step(h, inp):
        dt_t, b_t, c_t, x_t, real_t = inp
        h_new = jnp.exp(dt_t[:, None] * a) * h + (dt_t * x_t)[:, None] * b_t[None, :]
        y_t = jnp.sum(h_new * c_t[None, :], axis=-1)  # [d_inner]
        return jnp.where(real_t, h_new, h), y_t

    h, ys = jax.lax.scan(step, ssm_state, (dt, b, c, xc, real))
    y = (ys + params.D.astype(_F32) * xc) * jax.nn.silu(z)
    out = _mm(y, params.out_proj).astype(x.dtype)
    return out, new_conv_state, h


def mamba_forward_batch(params: MambaParams, x, conv_states, ssm_states, *, valid_lens=None):
    """:func:`mamba_forward` over a batch of requests (vmap).

    x [B, T, d_model]; conv_states [B, d_conv - 1, d_inner]; ssm_states [B, d_inner,
    d_state]; valid_lens int [B] (default all T). Returns (y [B, T, d_model],
    conv_states, ssm_states), the states float32.
    """
    d = _check_params(params)
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[2] != d.d_model or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float array [B, T, {d.d_model}], got {x.dtype} {x.shape}")
    batch, t_len = x.shape[:2]
    conv_states = _float_array("conv_states", conv_states, (batch, d.d_conv - 1, d.d_inner))
    ssm_states = _float_array("ssm_states", ssm_states, (batch, d.d_inner, d.d_state))
    if valid_lens is None:
        valid_lens = jnp.full((batch,), t_len, jnp.int32)
    valid_lens = _lengths("valid_lens", valid_lens, (batch,), t_len)

    def one(xi, ci, si, ni):
        return mamba_forward(params, xi, ci, si, valid_len=ni)

    return jax.vmap(one)(x, conv_states, ssm_states, valid_lens)


# --------------------------------------------------------------------------- state pages


def state_layer_elems(*, d_inner: int, d_state: int, d_conv: int) -> int:
    """Float32 elements of one layer's state: (d_conv - 1) * d_inner + d_inner * d_state."""
    _check_pos_int(d_inner=d_inner, d_state=d_state, d_conv=d_conv)
    return (d_conv - 1) * d_inner + d_inner * d_state


def state_page_elems(*, layers_per_page: int, d_inner: int, d_state: int, d_conv: int) -> int:
    """Float32 elements of one state page holding ``layers_per_page`` layers."""
    _check_pos_int(layers_per_page=layers_per_page)
    return layers_per_page * state_layer_elems(d_inner=d_inner, d_state=d_state, d_conv=d_conv)


def state_view(
    pool,
    *,
    layers_per_page: int,
    d_inner: int,
    d_state: int,
    d_conv: int,
    page_elems: int | None = None,
):
    """Zero-copy view of the pool for a state kind.

    States are stored in the pool's dtype (float32 keeps them exact; a bfloat16 pool
    rounds them on every write, as vLLM's default mamba cache dtype does) and computed
    in float32. pool [rows, lane] (any float dtype) -> [num_pages, page_elems // lane,
    lane] when pages and one layer's state are whole rows, else flat [num_pages,
    page_elems]. page_elems: the page size (default: exactly its layers'
    states, :func:`state_page_elems`).
    """
    if pool.ndim != 2:
        raise ValueError(f"pool must be [rows, lane], got {pool.shape}")
    if not jnp.issubdtype(pool.dtype, jnp.floating):
        raise ValueError(f"the pool must be a float array, got {pool.dtype}")
    per_layer = state_layer_elems(d_inner=d_inner, d_state=d_state, d_conv=d_conv)
    used = state_page_elems(
        layers_per_page=layers_per_page, d_inner=d_inner, d_state=d_state, d_conv=d_conv
    )
    page = used if page_elems is None else page_elems
    if page < used:
        raise ValueError(
            f"a page of {page} elements cannot hold {layers_per_page} states of {per_layer}"
        )
    if pool.size % page:
        raise ValueError(
            f"the pool {list(pool.shape)} is not a whole number of state pages ({page} "
            f"elements; {layers_per_page} layers x ({d_conv - 1} x {d_inner} conv + "
            f"{d_inner} x {d_state} ssm) = {used})"
        )
    num_pages, lane = pool.size // page, pool.shape[1]
    if page % lane or per_layer % lane:
        return pool.reshape(num_pages, page)
    return pool.reshape(num_pages, page // lane, lane)


def _check_state_view(view) -> None:
    if view.ndim not in (2, 3):
        raise ValueError(
            f"view must be [pages, rows, lane] or [pages, page_elems] (see state_view), "
            f"got shape {view.shape}"
        )


def _page_index(page, view, *, unique: bool) -> jax.Array:
    """page ids (any shape) -> indices where anything but a real page is out of bounds."""
    num_pages = view.shape[0]
    page = jnp.asarray(page)
    if not jnp.issubdtype(page.dtype, jnp.integer):
        raise ValueError(f"page must be an integer (array), got dtype {page.dtype}")
    page = page.astype(jnp.int32)
    if not _traced(page):
        p = np.asarray(page)
        if np.any((p < -1) | (p >= num_pages)):
            raise ValueError(f"page must be -1 (none) or in [0, {num_pages}), got {p}")
        real = p[p >= 0]
        if unique and len(np.unique(real)) != real.size:
            raise ValueError(f"two states written to the same page: {p}")
    # JAX wraps negative indices (-1 -> last page) even with mode="drop"/"fill", so
    # anything that is not a real page goes to page `num_pages`, which both skip.
    return jnp.where((page >= 0) & (page < num_pages), page, num_pages)


def _layer_slice(view, layer, per_layer: int) -> slice:
    """Where layer `layer`'s state lies in a page of the view: its rows (a rows view,
    [pages, rows, lane]) or its elements (a flat view)."""
    _check_state_view(view)
    unit = view.shape[2] if view.ndim == 3 else 1  # elements per index of axis 1
    page = view.shape[1] * unit
    if per_layer % unit:
        raise ValueError(f"a state of {per_layer} elements is not whole rows of {unit}")
    layers = page // per_layer
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ValueError(f"layer must be an int in [0, {layers}), got {layer!r}")
    if not 0 <= layer < layers:
        raise ValueError(f"layer must be an int in [0, {layers}), got {layer!r}")
    n = per_layer // unit
    return slice(layer * n, (layer + 1) * n)


def read_state(view, page, layer: int, *, d_inner: int, d_state: int, d_conv: int):
    """One layer's state from its page.

    view [pages, rows, lane] or [pages, page_elems] (see :func:`state_view`); page int
    or int array of any shape P (may be traced; -1 = no page). Returns (conv_state
    [*P, d_conv - 1, d_inner], ssm_state [*P, d_inner, d_state]), float32; zeros where
    page is -1. Concrete ids outside [-1, pages) raise; traced ones read zeros.
    """
    per_layer = state_layer_elems(d_inner=d_inner, d_state=d_state, d_conv=d_conv)
    where = _layer_slice(view, layer, per_layer)
    idx = _page_index(page, view, unique=False)
    state = view.at[idx, where].get(mode="fill", fill_value=0)  # [*P, n(, lane)]
    state = state.reshape(*idx.shape, per_layer).astype(_F32)
    split = (d_conv - 1) * d_inner
    conv = state[..., :split].reshape(*idx.shape, d_conv - 1, d_inner)
    ssm = state[..., split:].reshape(*idx.shape, d_inner, d_state)
    return conv, ssm


def write_state(view, page, layer: int, conv_state, ssm_state, *, after=None):
    """Store one layer's state into its page; returns the new view.

    view [pages, rows, lane] or [pages, page_elems] (see :func:`state_view`); page int
    or int array of shape P
    (may be traced; -1 = drop); conv_state [*P, d_conv - 1, d_inner]; ssm_state
    [*P, d_inner, d_state] (cast to view.dtype). Nothing is written where page is -1;
    concrete ids outside [-1, pages) or a real page repeated raise, traced out-of-range
    ids are dropped (never clipped onto a real page).

    after: an array computed from the old state besides the new state (the layer's
    output). The write is made to depend on it (through a dropped padding row), so
    that XLA sees every read of the old view ordered before this in-place write;
    otherwise XLA:CPU may copy the whole pool to keep a late reader correct. A narrow-
    float view is scattered on its bits on CPU (``inplace.scatter_set``).
    """
    _check_state_view(view)
    idx = _page_index(page, view, unique=True)
    conv_state, ssm_state = jnp.asarray(conv_state), jnp.asarray(ssm_state)
    lead = idx.shape
    nl = len(lead)
    ok = (
        conv_state.ndim == nl + 2
        and ssm_state.ndim == nl + 2
        and conv_state.shape[:nl] == lead
        and ssm_state.shape[:nl] == lead
        and conv_state.shape[-1] == ssm_state.shape[-2]
    )
    per_layer = math.prod(conv_state.shape[-2:]) + math.prod(ssm_state.shape[-2:])
    if not ok:
        raise ValueError(
            f"for page shape {lead}, conv_state must be [*{lead}, d_conv - 1, d_inner] and "
            f"ssm_state [*{lead}, d_inner, d_state] (as many elements per layer as the "
            f"view's pages hold), got {conv_state.shape} and {ssm_state.shape}"
        )
    where = _layer_slice(view, layer, per_layer)
    state = jnp.concatenate(
        [conv_state.reshape(*lead, -1), ssm_state.reshape(*lead, -1)], axis=-1
    ).astype(view.dtype)
    rows = (where.stop - where.start, *view.shape[2:])  # (n,) or (n, lane)
    idx, state = idx.reshape(-1), state.reshape(-1, *rows)  # [P], [P, *rows]
    # One dropped padding row: it keeps a single write a scatter (XLA rewrites a
    # one-index scatter into a dynamic-update-slice, which XLA:CPU copies the pool
    # for) and carries `after`.
    pad = jnp.zeros((1, *rows), state.dtype)
    if after is not None:
        pad = pad + jnp.sum(jnp.asarray(after, _F32)).astype(state.dtype)
    idx = jnp.concatenate([idx, jnp.full((1,), view.shape[0], idx.dtype)])
    # A narrow-float view is scattered on its bits on CPU (see inplace.py).
    return scatter_set(view, (idx, where), jnp.concatenate([state, pad]))
