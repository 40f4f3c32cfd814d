"""Dense layers and their initializer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_HIGHEST = jax.lax.Precision.HIGHEST


def normal_init(rngs: nnx.Rngs, shape, fan_in: int, dtype: str):
    return jax.random.normal(rngs.params(), shape, dtype) * fan_in**-0.5


class Dense(nnx.Module):
    """x [..., d_in] -> [..., d_out] (optional bias)."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype: str, rngs: nnx.Rngs):
        self.kernel = nnx.Param(normal_init(rngs, (d_in, d_out), d_in, dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x):
        y = jnp.einsum("...i,io->...o", x, self.kernel[...], precision=_HIGHEST)
        return y if self.bias is None else y + self.bias[...]
