"""The shared KV pool and the static description of every kind's view of it.

One buffer ``pool [rows, lane]`` holds every kind's pages: ``num_large_pages`` large
pages of ``large_page_elems`` elements, row-major. The host plan
(``jenga_jax.core.page_plan``) numbers each kind's small pages so that page ``p`` of kind
``k`` sits at flat element offset ``p * page_elems(k)``: a kind's view is a reshape of
the same buffer (:meth:`PoolLayout.view`), which XLA compiles to a bitcast. ``lane``
divides every page and is the kinds' head dim where they share one, so that on TPU,
whose layouts tile the two minor dims, the token views ``[pages, layers, tpp,
2 * kv_heads, head_dim]`` and the state views ``[pages, rows, lane]`` keep the pool's
tiling: a step updates the pool in place (docs/device.md, "The pool on TPU"). Every
kind stores its K/V (or state) in the pool's dtype. On CPU a pool of a narrow float
(bfloat16, float16, float8) is stored as unsigned ints of the same bits
(``jenga_jax/device/inplace.py``: XLA:CPU updates only those in place); its views are
floats all the same, and :meth:`PoolLayout.values` reads it as floats.

The baseline plans map onto the same views (see docs/device.md, "Baseline plans on the
device"): the paged plan's one token kind holds every attention layer (``mixed``: each
layer applies its own mask) and, on a model with cross attention, the images ahead of
the text in each request's token stream (``inline_images``); state pages larger than
their states (paged, uniform; TPU-aligned plans) keep their rows, the tail unused
(``padded``).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jenga_jax.core.layer_kinds import DTYPE_BYTES, AttentionType
from jenga_jax.core.page_plan import PagePlan
from jenga_jax.device import inplace
from jenga_jax.device.mamba import state_view
from jenga_jax.device.reference_attention import kind_view


@dataclasses.dataclass(frozen=True)
class KindView:
    """How one planned kind sees the pool (all static ints)."""

    type: AttentionType
    num_pages: int
    page_elems: int
    num_layers: int  # layers per page (padding layers included)
    tokens_per_page: int = 0  # token and cross kinds
    kv_heads: int = 0
    head_dim: int = 0
    window: int | None = None
    chunk: int | None = None
    pages_per_state: int = 0  # state kinds: one state spans this many pages
    state_dims: tuple[int, int, int] = (0, 0, 0)  # state kinds: (d_inner, d_state, d_conv)
    mixed: bool = False  # token kinds: layers of several rules (paged), each masks its own
    inline_images: bool = False  # paged: each request's stream is [images][text]

    @property
    def is_state(self) -> bool:
        return self.type is AttentionType.STATE

    @property
    def layers_per_page(self) -> int:
        return self.num_layers // self.pages_per_state if self.is_state else self.num_layers

    @property
    def padded(self) -> bool:
        """State kinds: the page holds more elements than its layers' states."""
        d_inner, d_state, d_conv = self.state_dims
        per_layer = (d_conv - 1) * d_inner + d_inner * d_state
        return self.is_state and self.page_elems > self.layers_per_page * per_layer


def pool_lane(kinds) -> int:
    """The pool's minor dim: the largest divisor of every kind's page and head dim (the
    head dim where the token kinds share one and every page is whole rows of it;
    gcd(128, pages) without token kinds)."""
    head_dims = [k.head_dim for k in kinds if not k.is_state]
    return math.gcd(*(head_dims or [128]), *(k.page_elems for k in kinds))


@dataclasses.dataclass(frozen=True)
class LayerSlot:
    """Where model layer i lives: its kind, the state page among the state's pages, the slot."""

    kind: int
    part: int  # state kinds: which of the state's pages (0 for token kinds)
    slot: int  # layer index inside the kind's page


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    """Static shape of the pool and of every kind's view; hashable (a jit static)."""

    dtype: str
    num_large_pages: int
    large_page_elems: int
    kinds: tuple[KindView, ...]
    layer_slots: tuple[LayerSlot | None, ...]  # per model layer
    lane: int = 1  # the pool's minor dim (pool_lane)

    @classmethod
    def from_plan(
        cls,
        plan: PagePlan,
        num_large_pages: int,
        *,
        state_dims: tuple[int, int, int] | None = None,
    ) -> PoolLayout:
        """The views of a plan (jenga, paged or uniform). state_dims = (d_inner, d_state,
        d_conv)."""
        dtypes = {layer.dtype for layer in plan.layout.layers}  # (the paged plan's state
        # rule leaves its dtype at the default: the layers' own kinds say what is stored)
        if len(dtypes) != 1:
            raise ValueError(
                f"one pool holds one dtype; the layout's layers use {sorted(dtypes)} "
                "(plan every kind, states included, in the same dtype)"
            )
        dtype = dtypes.pop()
        itemsize = DTYPE_BYTES[dtype]
        if num_large_pages < 1:
            raise ValueError(f"num_large_pages must be >= 1, got {num_large_pages}")
        large_elems = plan.large_page_bytes // itemsize
        kinds = []
        slots: list[LayerSlot | None] = [None] * plan.layout.num_layers
        for k, pk in enumerate(plan.kinds):
            page_elems = pk.page_bytes // itemsize
            common = dict(
                type=pk.type,
                num_pages=num_large_pages * (large_elems // page_elems),
                page_elems=page_elems,
                num_layers=pk.num_layers,
            )
            rules = [plan.layout.layers[i] for i in pk.layer_indices]
            if pk.type is AttentionType.STATE:
                view = _state_view(pk, common, rules, state_dims, itemsize)
                for j, layer in enumerate(pk.layer_indices):
                    lpp = view.layers_per_page
                    slots[layer] = LayerSlot(k, j // lpp, j % lpp)
            else:
                view = _token_view(pk, common, rules, plan.images_inline, itemsize)
                for j, layer in enumerate(pk.layer_indices):
                    slots[layer] = LayerSlot(k, 0, j)
            kinds.append(view)
        kinds = tuple(kinds)
        return cls(dtype, num_large_pages, large_elems, kinds, tuple(slots), pool_lane(kinds))

    @property
    def cross_kinds(self) -> tuple[int, ...]:
        """Indices of the cross-attention kinds."""
        return tuple(k for k, v in enumerate(self.kinds) if v.type is AttentionType.CROSS)

    @property
    def image_kinds(self) -> tuple[int, ...]:
        """Indices of the kinds storing encoder (image) tokens: cross or inline."""
        return tuple(
            k for k, v in enumerate(self.kinds) if v.type is AttentionType.CROSS or v.inline_images
        )

    @property
    def shape(self) -> tuple[int, int]:
        """The pool's shape, [rows, lane]."""
        return (self.num_large_pages * self.large_page_elems // self.lane, self.lane)

    @property
    def nbytes(self) -> int:
        return self.num_large_pages * self.large_page_elems * DTYPE_BYTES[self.dtype]

    def storage_dtype(self, platform: str | None = None) -> np.dtype:
        """The dtype the pool is stored in on `platform` (None: JAX's default backend):
        the layout's dtype, or its bits (uint16 for bfloat16) on CPU."""
        return inplace.storage_dtype(self.dtype, platform)

    def full(self, value: float, platform: str | None = None):
        """A pool filled with `value` (0 for a fresh pool; NaN poisons pages nothing
        wrote, in tests), stored for `platform` (:meth:`storage_dtype`)."""
        if self.storage_dtype(platform) != np.dtype(self.dtype):
            return inplace.full_bits(self.shape, value, self.dtype)
        return jnp.full(self.shape, value, self.dtype)

    def values(self, pool):
        """The pool as floats of the layout's dtype [rows, lane] (a bitcast of a pool
        stored as bits)."""
        dtypes = {np.dtype(self.dtype), self.storage_dtype("cpu")}
        if pool.shape != self.shape or pool.dtype not in dtypes:
            want = " or ".join(sorted(str(d) for d in dtypes))
            raise ValueError(
                f"pool must be {want} {list(self.shape)}, got {pool.dtype} {pool.shape}"
            )
        return inplace.as_float(pool, self.dtype)

    def view(self, pool, kind: int):
        """Kind `kind`'s zero-copy view, floats of the layout's dtype: token kinds [pages,
        layers, tpp, 2 * kv_heads, head_dim], state kinds [pages, rows, lane] ([pages,
        page_elems] when a layer's state is not whole rows; see
        ``jenga_jax.device.mamba.state_view``). The pool is stored in the layout's dtype
        or as its bits (:meth:`storage_dtype`)."""
        pool = self.values(pool)
        kv = self.kinds[kind]
        if kv.is_state:
            d_inner, d_state, d_conv = kv.state_dims
            return state_view(
                pool,
                layers_per_page=kv.layers_per_page,
                d_inner=d_inner,
                d_state=d_state,
                d_conv=d_conv,
                page_elems=kv.page_elems,
            )
        return kind_view(
            pool,
            num_layers=kv.num_layers,
            kv_heads=kv.kv_heads,
            tokens_per_page=kv.tokens_per_page,
            head_dim=kv.head_dim,
        )

    def unview(self, view, dtype=None):
        """Back to the pool shape (a bitcast, like :meth:`view`), stored as `dtype`
        (None: the view's floats; or their bits: the dtype of the pool viewed)."""
        pool = view.reshape(self.shape)
        return pool if dtype is None else inplace.as_stored(pool, dtype)


def _state_view(pk, common: dict, rules, state_dims, itemsize: int) -> KindView:
    """A state kind's view. A page holds `layers_per_page` real (or padding) layers'
    states, possibly fewer elements than the page (padded: paged and uniform plans).
    The paged plan's one state page holds every Mamba layer (num_layers 1)."""
    if state_dims is None:
        raise ValueError("the plan has a state kind: pass state_dims")
    d_inner, d_state, d_conv = state_dims
    per_layer = (d_conv - 1) * d_inner + d_inner * d_state
    if any(r.state_bytes != per_layer * itemsize for r in rules):
        raise ValueError(
            f"state_dims {state_dims} give {per_layer * itemsize} B per layer, but the "
            f"layout's states have {sorted({r.state_bytes for r in rules})} B"
        )
    stored = max(pk.num_layers, len(pk.layer_indices))  # layers the pages hold in all
    per_page, page_elems = stored // pk.pages_per_state, common["page_elems"]
    if stored % pk.pages_per_state or per_page * per_layer > page_elems:
        raise ValueError(
            f"state page of {page_elems} elements does not hold {per_page} layers of "
            f"{per_layer} (state_dims {state_dims})"
        )
    common = dict(common, num_layers=stored)
    return KindView(**common, pages_per_state=pk.pages_per_state, state_dims=state_dims)


def _token_view(pk, common: dict, rules, images_inline: bool, itemsize: int) -> KindView:
    """A token (or cross) kind's view: the page is exactly its layers' K/V, and every
    layer stored has the kind's kv heads and head dim."""
    rule = pk.rule
    per_page = pk.num_layers * 2 * rule.num_kv_heads * pk.tokens_per_page * rule.head_dim
    if per_page * itemsize != pk.page_bytes:
        raise ValueError(
            f"{rule.name}: a page of {pk.page_bytes} B is not exactly its {pk.num_layers} "
            f"layers' K/V ({per_page * itemsize} B); padded token pages are not supported"
        )
    shapes = {(r.num_kv_heads, r.head_dim) for r in rules}
    if shapes != {(rule.num_kv_heads, rule.head_dim)}:
        raise ValueError(
            f"{rule.name}: its layers have (kv_heads, head_dim) {sorted(shapes)}; one view "
            "needs one shape (the paged plan on a model whose attention layers differ)"
        )
    types = {r.type for r in rules}
    return KindView(
        **common,
        tokens_per_page=pk.tokens_per_page,
        kv_heads=rule.num_kv_heads,
        head_dim=rule.head_dim,
        window=rule.window,
        chunk=rule.chunk,
        mixed=types != {rule.type},
        inline_images=images_inline and AttentionType.CROSS in types,
    )
