"""Compile for TPUs on any machine and read what the program uses (no TPU needed).

With ``libtpu`` installed (the ``tpu`` extra), ``jax.experimental.topologies`` describes
a TPU slice without the hardware; its devices are compile-only. Inputs placed on one
(``jax.ShapeDtypeStruct(..., sharding=SingleDeviceSharding(dev))``) make
``jax.jit(fn).lower(...).compile()`` run libtpu's XLA and the Mosaic compiler for that
chip, and ``memory_analysis()`` of the result gives the bytes of arguments, outputs,
aliases (donated inputs updated in place) and temporaries. Nothing runs.

libtpu takes a lock file per process unless ``ALLOW_MULTIPLE_LIBTPU_LOAD=1``
(:func:`device` sets it before libtpu loads), so that tests and benchmarks may run side
by side.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from pallas_kernels import mosaic_paged

# target -> get_topology_desc keywords of a one-chip slice
TARGETS = {
    "v5e": dict(topology_name="v5e:1x1", chips_per_host_bounds=(1, 1, 1)),
    "v6e": dict(topology_name="v6e:1x1", chips_per_host_bounds=(1, 1, 1)),
    "v5p": dict(topology_name="v5p:1x1x1", chips_per_host_bounds=(1, 1, 1)),
    "v4": dict(topology_name="v4:2x2x1", chip_config_name="megacore"),
}


def available() -> bool:
    """Whether libtpu is installed (compile-only devices need nothing else)."""
    return importlib.util.find_spec("libtpu") is not None


@functools.cache
def device(target: str = "v5e"):
    """A compile-only device of ``target`` (see TARGETS)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", **TARGETS[target]).devices[0]


def place(tree, dev):
    """Arrays / ShapeDtypeStructs of a pytree -> ShapeDtypeStructs on ``dev``."""
    sharding = SingleDeviceSharding(dev)

    def one(x):
        if x is None:
            return None
        return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=sharding)

    return jax.tree.map(one, tree)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What one compile gave: ok, XLA's byte counts (None when it failed), the error."""

    ok: bool
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    error: str | None = None


def compile_stats(jitted, *args) -> Compiled:
    """Lowers and compiles ``jitted`` (a ``jax.jit`` function) for the args' device."""
    try:
        mem = jitted.lower(*args).compile().memory_analysis()
    except Exception as e:  # a failing compile is a result, reported with its message
        return Compiled(False, error=f"{type(e).__name__}: {str(e)[:300]}")
    return Compiled(
        True,
        argument_bytes=mem.argument_size_in_bytes,
        output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes,
    )


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """Shapes of one Mosaic paged-attention call (one layer, every row ``context`` keys).

    ``q_len`` 1: decode. The pool holds ``pool_tokens`` tokens (default: every row's
    context on its own pages, at most 2^18 tokens, so that it fits any chip's HBM: the
    block tables' entries are data, the compiled kernel is the same), stored 2-D
    ``[rows, head_dim]`` as in the engine.
    """

    batch: int
    q_len: int
    context: int
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    kind: str = "full"
    tpp: int = 16
    pool_tokens: int | None = None
    options: tuple = ()  # (name, value) pairs: window, chunk, soft_cap, block_rows, ...
    sinks: bool = False
    page_fill: bool = False

    @property
    def max_pages(self) -> int:
        return -(-self.context // self.tpp)

    @property
    def pool_shape(self) -> tuple[int, int]:
        tokens = self.pool_tokens or min(self.batch * self.context, 2**18)
        pages = -(-tokens // self.tpp)
        return (pages * self.tpp * 2 * self.kv_heads, self.head_dim)

    @property
    def pool_bytes(self) -> int:
        return math.prod(self.pool_shape) * jnp.dtype(self.dtype).itemsize

    def function(self):
        """A jitted fn(q, pool, block_tables, kv_lens, q_positions[, sinks][, page_fill])."""
        opts = dict(layer=0, kind=self.kind, scale=self.head_dim**-0.5, **dict(self.options))
        pages = self.pool_shape[0] // (self.tpp * 2 * self.kv_heads)
        view_shape = (pages, 1, self.tpp, 2 * self.kv_heads, self.head_dim)

        def fn(q, pool, block_tables, kv_lens, q_positions, *extra):
            extra = list(extra)
            sinks = extra.pop(0) if self.sinks else None
            page_fill = extra.pop(0) if self.page_fill else None
            view = pool.reshape(view_shape)  # as kind_view: a bitcast of the pool
            return mosaic_paged.paged_attention(
                q, view, block_tables, kv_lens, q_positions, sinks=sinks, page_fill=page_fill,
                **opts,
            )  # fmt: skip

        return jax.jit(fn)

    def args(self, dev):
        b, n = self.batch, self.q_len
        dtype = jnp.dtype(self.dtype)
        shapes = [
            ((b, n, self.q_heads, self.head_dim), dtype),
            (self.pool_shape, dtype),
            ((b, self.max_pages), jnp.int32),
            ((b,), jnp.int32),
            ((b, n), jnp.int32),
        ]
        if self.sinks:
            shapes.append(((self.q_heads,), jnp.float32))
        if self.page_fill:
            shapes.append(((b, self.max_pages), jnp.int32))
        return place([jax.ShapeDtypeStruct(s, d) for s, d in shapes], dev)

    def compile(self, target: str = "v5e") -> Compiled:
        return compile_stats(self.function(), *self.args(device(target)))
