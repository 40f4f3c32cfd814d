"""bfloat16 pools are updated in place on XLA:CPU, like float32 ones.

XLA:CPU has no bfloat16 scatter: it upcasts the operand, the whole pool, to float32 and
back on every write (temporaries twice the pool, step time growing with the pool). The
pool is stored and scattered as uint16 bits instead (``jenga_jax/device/inplace.py``).
Checked from ``memory_analysis`` of the compiled steps of every tiny family, on a small
pool (the temporaries left are the float32 copies of the tiny weights, ~0.7 MiB, none
sized by the pool), and the bits written.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jenga_jax.core import make_plan
from jenga_jax.device import inplace
from jenga_jax.device.pool import PoolLayout
from jenga_jax.device.reference_attention import kind_view, write_kv
from jenga_jax.engine.steps import StepInputs, make_steps
from jenga_jax.engine.warmup import padding_table
from models import FAMILIES, HybridDecoder, tiny_config

MIB = 2**20


def _bf16_steps(family: str, pool_bytes: int):
    cfg = dataclasses.replace(tiny_config(family), dtype="bfloat16")
    plan = make_plan(cfg.layout(cfg.dtype))
    state_dims = (cfg.d_inner, cfg.mamba.d_state, cfg.mamba.d_conv) if cfg.mamba else None
    layout = PoolLayout.from_plan(
        plan, math.ceil(pool_bytes / plan.large_page_bytes), state_dims=state_dims
    )
    model = HybridDecoder(cfg, rngs=nnx.Rngs(0))
    return cfg, layout, make_steps(model, layout, attention_backend="reference")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_steps_update_the_pool_in_place(family):
    """Prefill (with images where the family has them) and decode: the pool is aliased
    and the temporaries stay under 10% of it."""
    cfg, layout, steps = _bf16_steps(family, 32 * MIB)
    pool = layout.full(0.0)
    encoder = 16 if cfg.vision_dim else 0
    for fn, queries, enc in ((steps.prefill, 16, encoder), (steps.decode, 1, 0)):
        table = padding_table(layout, 2, queries, [4] * len(layout.kinds), enc)
        embeds = np.zeros((2, enc, cfg.vision_dim), cfg.dtype) if enc else None
        inputs = StepInputs(np.zeros((2, queries), np.int32), embeds)
        mem = fn.lower(steps.params, pool, table, inputs).compile().memory_analysis()
        assert mem.alias_size_in_bytes >= layout.nbytes, (family, queries, mem)
        assert mem.temp_size_in_bytes < 0.1 * layout.nbytes, (family, queries, mem)


def test_bf16_writes_are_bit_exact():
    """K/V written through a pool stored as bits land bit for bit (a signalling NaN, -0
    and inf included), and nothing else changes."""
    dims = dict(num_layers=2, kv_heads=2, tokens_per_page=4, head_dim=8)
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(6, 2 * 2 * 2 * 4 * 8)).astype(jnp.bfloat16)  # 6 pages
    k = rng.normal(size=(3, 2, 8)).astype(jnp.bfloat16)
    v = rng.normal(size=(3, 2, 8)).astype(jnp.bfloat16)
    k[0, 0, :3] = np.array([0x7F81, 0x8000, 0x7F80], np.uint16).view(jnp.bfloat16)
    pages, offsets = np.array([4, -1, 1]), np.array([3, 0, 2])

    def step(bits):  # uint16 [6, 256], as PoolLayout stores a bfloat16 pool on CPU
        view = kind_view(inplace.as_float(bits, jnp.bfloat16), **dims)
        view = write_kv(view, k, v, pages, offsets, layer=1)
        return inplace.as_stored(view.reshape(bits.shape), bits.dtype)

    got = jax.jit(step, donate_argnums=0)(jnp.asarray(pool.view(np.uint16)))
    want = pool.reshape(6, 2, 4, 2 * 2, 8).copy()  # [pages, layers, tpp, 2 * kv_heads, D]
    for t in (0, 2):
        want[pages[t], 1, offsets[t], :2] = k[t]
        want[pages[t], 1, offsets[t], 2:] = v[t]
    np.testing.assert_array_equal(np.asarray(got), want.reshape(6, -1).view(np.uint16))
