"""Compiled for real TPUs without one: the Mosaic kernel at serving sizes, and whole steps
that update the pool in place.

Compile-only devices of ``jax.experimental.topologies`` (``pallas_kernels/tpu_compile.py``;
needs libtpu, the ``tpu`` extra, else every test skips): libtpu's XLA and the Mosaic
compiler really run, and ``memory_analysis()`` of the compiled step says whether the
donated pool is aliased and how many bytes of temporaries it needs. A step that copies
the pool (a relayout of the view, a scatter into a layout XLA picked) has temporaries of
the pool's size; in place, only activations. ``test_old_layout_copies_the_pool`` keeps
the evidence that this check can fail: the layout before the token-major pool, built
here, copies the pool on every write.

v5e in CI; the other generations (v6e, v5p, v4 megacore) under ``-m tpu_generations``
(CI deselects the marker: each compile takes 5-40 s on a busy CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mosaic_paged, tpu_compile

needs_libtpu = pytest.mark.skipif(
    not tpu_compile.available(), reason="libtpu is not installed (pip install -e '.[tpu]')"
)

MIB = 2**20
CONTEXT = 128 * 1024  # tokens per row
POOL = 256 * MIB  # the steps' pool
TEMP_LIMIT = 0.05  # temporaries / pool of an in-place step
OTHER_TARGETS = [
    pytest.param(t, marks=pytest.mark.tpu_generations) for t in tpu_compile.TARGETS if t != "v5e"
]
FAMILIES = ["gemma3", "llama-vision", "jamba"]  # sliding + full; cross; Mamba state


# ----------------------------------------------------------------- the kernel alone


@functools.cache
def _kernel(batch, q_len, target="v5e", **case):
    return tpu_compile.KernelCase(batch, q_len, CONTEXT, **case).compile(target)


@needs_libtpu
@pytest.mark.parametrize(
    "batch,q_len", [(64, 1), (64, 256), (256, 1)], ids=["decode-64", "prefill-64", "decode-256"]
)
def test_kernel_compiles_at_128k_context(batch, q_len):
    """bf16, 32 query / 8 KV heads of 128, 8192 pages per row: the block table is a
    per-request SMEM block (the whole table, 2 MiB at batch 64, does not fit SMEM)."""
    got = _kernel(batch, q_len)
    assert got.ok, got.error


@needs_libtpu
@pytest.mark.parametrize(
    "case",
    [
        dict(kind="sliding", options=(("window", 4096), ("soft_cap", 50.0)), sinks=True),
        dict(kind="chunked", options=(("chunk", 8192),)),
        dict(kind="cross", page_fill=True),
        dict(dtype="float32", tpp=8),
        dict(q_heads=8, kv_heads=1),  # MQA: K and V of the one head share a 32-bit word
    ],
    ids=["sliding-softcap-sinks", "chunked", "cross-fill", "f32", "mqa"],
)
def test_kernel_options_compile(case):
    got = tpu_compile.KernelCase(4, 16, 4096, pool_tokens=2**16, **case).compile("v5e")
    assert got.ok, got.error


@needs_libtpu
@pytest.mark.parametrize("target", OTHER_TARGETS)
@pytest.mark.parametrize("q_len", [1, 256], ids=["decode", "prefill"])
def test_kernel_compiles_on_other_generations(target, q_len):
    got = _kernel(64, q_len, target)
    assert got.ok, got.error


# ----------------------------------------------------------------- whole steps


def _step(family, what, target):
    from jenga_jax.engine import aot

    case = aot.step_case(family, what, tpu_compile.device(target), pool_bytes=POOL)
    return case, tpu_compile.compile_stats(case.fn, *case.args)


def _check_in_place(case, got):
    assert got.ok, got.error
    assert got.alias_bytes >= case.pool_bytes, got
    assert got.temp_bytes < TEMP_LIMIT * case.pool_bytes, (got, case.pool_bytes)


@needs_libtpu
@pytest.mark.parametrize("what", ["prefill", "decode"])
@pytest.mark.parametrize("family", FAMILIES)
def test_step_updates_the_pool_in_place(family, what):
    """bf16, d_model 1024, 32 / 8 heads of 128, a 256 MiB pool, the Mosaic kernel: the
    pool is aliased and the temporaries are under 5% of it."""
    _check_in_place(*_step(family, what, "v5e"))


@needs_libtpu
@pytest.mark.parametrize("target", OTHER_TARGETS)
@pytest.mark.parametrize("what", ["prefill", "decode"])
@pytest.mark.parametrize("family", FAMILIES)
def test_step_in_place_on_other_generations(family, what, target):
    _check_in_place(*_step(family, what, target))


# ----------------------------------------------------------------- the check can fail


def _old_layout_write(pool, k, v, pages, offsets, *, pages_per_large, layer, view_shape):
    """One layer's K/V write as before the token-major pool: the pool [large pages,
    elems] viewed as [pages, layers, 2, kv_heads, tpp, head_dim], scattered there."""
    view = pool.reshape(view_shape)
    kv = jnp.stack([k, v], axis=1)  # [tokens, 2, kv_heads, head_dim]
    view = view.at[pages, layer, :, :, offsets, :].set(kv, mode="drop")
    return view.reshape(pool.shape)


def _new_layout_write(pool, k, v, pages, offsets, *, layer, view_shape):
    """The same write on the token-major view [pages, layers, tpp, 2 * kv_heads, head_dim]."""
    view = pool.reshape(view_shape)
    kv = jnp.concatenate([k, v], axis=1)  # [tokens, 2 * kv_heads, head_dim]
    view = view.at[pages, layer, offsets].set(kv, mode="drop")
    return view.reshape(pool.shape)


@needs_libtpu
@pytest.mark.parametrize("layout", ["old", "new"])
def test_old_layout_copies_the_pool(layout):
    """Control for the in-place checks above: the same 256 MiB bf16 pool, 4 layers x 8 KV
    heads x 16 tokens x 128 per page, 64 tokens written into layer 1. Viewed the old way
    (pool [large pages, elems] -> [pages, layers, 2, kv_heads, tpp, head_dim]) XLA on
    TPU relayouts and copies the pool (temporaries >= the pool); token-major over a
    pool [rows, head_dim], the write is in place."""
    dev = tpu_compile.device("v5e")
    layers, heads, tpp, dim = 4, 8, 16, 128
    page = layers * 2 * heads * tpp * dim
    num_pages = POOL // 2 // page
    tokens = 64
    args = [
        jax.ShapeDtypeStruct((tokens, heads, dim), jnp.bfloat16),
        jax.ShapeDtypeStruct((tokens, heads, dim), jnp.bfloat16),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
    ]
    if layout == "old":
        pool = jax.ShapeDtypeStruct((num_pages // 4, 4 * page), jnp.bfloat16)
        fn = functools.partial(
            _old_layout_write, pages_per_large=4, layer=1,
            view_shape=(num_pages, layers, 2, heads, tpp, dim),
        )  # fmt: skip
    else:
        pool = jax.ShapeDtypeStruct((num_pages * page // dim, dim), jnp.bfloat16)
        fn = functools.partial(
            _new_layout_write, layer=1, view_shape=(num_pages, layers, tpp, 2 * heads, dim)
        )
    placed = tpu_compile.place([pool, *args], dev)
    got = tpu_compile.compile_stats(jax.jit(fn, donate_argnums=0), *placed)
    assert got.ok, got.error
    assert got.alias_bytes >= POOL
    if layout == "old":
        assert got.temp_bytes >= POOL, got
    else:
        assert got.temp_bytes < TEMP_LIMIT * POOL, got


# ----------------------------------------------------------------- CPU-side helpers


def test_unpack_half_recovers_bf16_pairs():
    """The kernel's 2-byte loads: a 32-bit word holding rows 2i (low) and 2i + 1 (high)
    of a bf16 block gives both back exactly (-0 and infinities included)."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((16, 128)) * np.exp(rng.uniform(-30, 30, (16, 128)))
    bits = values.astype(jnp.bfloat16).view(np.uint16)
    bits[0, :3] = [0x7F80, 0xFF80, 0x8000]
    words = jnp.asarray(bits[0::2].astype(np.uint32) | (bits[1::2].astype(np.uint32) << 16))
    unpack = jax.jit(mosaic_paged.unpack_half, static_argnums=(1, 2))
    low, high = unpack(words, False, jnp.bfloat16), unpack(words, True, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(low).view(np.uint16), bits[0::2])
    np.testing.assert_array_equal(np.asarray(high).view(np.uint16), bits[1::2])
