"""One flash-attention step over a block of keys, shared by the Triton and Mosaic kernels.

Written with plain ``jnp`` ops that both Pallas lowerings support. Masked logits are
selected away with ``jnp.where`` before any arithmetic, so garbage (NaN) in keys nobody
may see cannot leak; a visible key on a missing page yields NaN, as in the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_precision(dtype):
    """Exact float32 products (no TF32 / bf16 passes) for float32 K/V."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def logits(q, k, *, scale: float, soft_cap: float | None):
    """q [R, D], k [K, D] (same dtype) -> scaled, soft-capped f32 logits [R, K]."""
    s = jax.lax.dot_general(
        q,
        k,
        (((1,), (1,)), ((), ())),
        precision=dot_precision(k.dtype),
        preferred_element_type=jnp.float32,
    )
    s = s * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    return s


def update(carry, s, visible, broken, v, *, keepdims: bool):
    """Folds one key block into the running (acc, m, l).

    carry: acc f32 [R, D], m and l f32 [R] (or [R, 1] with ``keepdims``); s f32 [R, K]
    logits; visible, broken bool [R, K] (broken: visible key on a missing page);
    v [K, D] with rows no query may see already zeroed.
    """
    acc, m_prev, l_prev = carry
    s = jnp.where(visible, s, -jnp.inf)
    s = jnp.where(broken, jnp.nan, s)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=keepdims))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # nothing seen yet: no -inf - -inf
    m_col = m_safe if keepdims else m_safe[:, None]
    p = jnp.exp(s - m_col)  # masked -> exactly 0
    alpha = jnp.exp(m_prev - m_safe)  # first block: exp(-inf) = 0
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=keepdims)
    pv = jax.lax.dot_general(
        p.astype(v.dtype),
        v,
        (((1,), (0,)), ((), ())),
        precision=dot_precision(v.dtype),
        preferred_element_type=jnp.float32,
    )
    alpha_col = alpha if keepdims else alpha[:, None]
    return alpha_col * acc + pv, m_next, l_next
