"""The shared KV pool and the static description of every kind's view of it.

One buffer ``pool [num_large_pages, large_page_elems]`` holds every kind's pages. The
host plan (``jenga_jax.core.page_plan``) numbers each kind's small pages so that page
``p`` of kind ``k`` sits at flat element offset ``p * page_elems(k)``: a kind's view is
a reshape of the same buffer (:meth:`PoolLayout.view`), which XLA compiles to a
bitcast. Every kind stores its K/V (or state) in the pool's dtype.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jenga_jax.core.layer_kinds import DTYPE_BYTES, AttentionType
from jenga_jax.core.page_plan import PagePlan
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

    @property
    def is_state(self) -> bool:
        return self.type is AttentionType.STATE

    @property
    def layers_per_page(self) -> int:
        return self.num_layers // self.pages_per_state if self.is_state else self.num_layers


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

    @classmethod
    def from_plan(
        cls,
        plan: PagePlan,
        num_large_pages: int,
        *,
        state_dims: tuple[int, int, int] | None = None,
    ) -> PoolLayout:
        """The views of a jenga/uniform plan. state_dims = (d_inner, d_state, d_conv)."""
        dtypes = {k.rule.dtype for k in plan.kinds}
        if len(dtypes) != 1:
            raise ValueError(
                f"one pool holds one dtype; the plan's kinds use {sorted(dtypes)} "
                "(plan every kind, states included, in the same dtype)"
            )
        dtype = dtypes.pop()
        if plan.images_inline:
            raise ValueError(f"the {plan.allocator!r} plan stores images inline; use 'jenga'")
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
            if pk.type is AttentionType.STATE:
                if state_dims is None:
                    raise ValueError("the plan has a state kind: pass state_dims")
                d_inner, d_state, d_conv = state_dims
                per_layer = (d_conv - 1) * d_inner + d_inner * d_state
                if per_layer * pk.layers_per_page != page_elems:
                    raise ValueError(
                        f"state page of {page_elems} elements does not hold "
                        f"{pk.layers_per_page} layers of {per_layer} (state_dims {state_dims})"
                    )
                view = KindView(**common, pages_per_state=pk.pages_per_state, state_dims=state_dims)
                for j, layer in enumerate(pk.layer_indices):
                    lpp = view.layers_per_page
                    slots[layer] = LayerSlot(k, j // lpp, j % lpp)
            else:
                rule = pk.rule
                view = KindView(
                    **common,
                    tokens_per_page=pk.tokens_per_page,
                    kv_heads=rule.num_kv_heads,
                    head_dim=rule.head_dim,
                    window=rule.window,
                    chunk=rule.chunk,
                )
                for j, layer in enumerate(pk.layer_indices):
                    slots[layer] = LayerSlot(k, 0, j)
            kinds.append(view)
        return cls(dtype, num_large_pages, large_elems, tuple(kinds), tuple(slots))

    @property
    def cross_kinds(self) -> tuple[int, ...]:
        """Indices of the cross-attention kinds."""
        return tuple(k for k, v in enumerate(self.kinds) if v.type is AttentionType.CROSS)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_large_pages, self.large_page_elems)

    @property
    def nbytes(self) -> int:
        return self.num_large_pages * self.large_page_elems * DTYPE_BYTES[self.dtype]

    def full(self, value: float):
        """A pool filled with `value` (0 for a fresh pool; NaN poisons pages nothing
        wrote, in tests)."""
        return jnp.full(self.shape, value, self.dtype)

    def view(self, pool, kind: int):
        """Kind `kind`'s zero-copy view: token kinds [pages, layers, 2, kv_heads, tpp, dim],
        state kinds [pages, layers_per_page, per_layer_elems]."""
        if pool.shape != self.shape or pool.dtype != np.dtype(self.dtype):
            raise ValueError(
                f"pool must be {self.dtype} {list(self.shape)}, got {pool.dtype} {pool.shape}"
            )
        kv = self.kinds[kind]
        if kv.is_state:
            d_inner, d_state, d_conv = kv.state_dims
            return state_view(
                pool,
                layers_per_page=kv.layers_per_page,
                d_inner=d_inner,
                d_state=d_state,
                d_conv=d_conv,
            )
        return kind_view(
            pool,
            num_layers=kv.num_layers,
            kv_heads=kv.kv_heads,
            tokens_per_page=kv.tokens_per_page,
            head_dim=kv.head_dim,
        )

    def unview(self, view):
        """Back to the pool shape (a bitcast, like :meth:`view`)."""
        return view.reshape(self.shape)
