"""Random parameters away from the neutral init (tests and demos; no weights needed)."""

from __future__ import annotations

import jax
from flax import nnx


def perturb(model: nnx.Module, *, seed: int, scale: float = 0.1) -> nnx.Module:
    """Add N(0, scale^2) noise to every parameter, in place; returns the model.

    A fresh model has zero gates, sinks and biases and neutral norms; the noise makes
    every one of them matter, so that a test comparing two paths can see each.
    """
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model
