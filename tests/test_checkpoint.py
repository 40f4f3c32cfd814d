"""Orbax parameter checkpoints: a round trip restores every array; another
architecture's checkpoint is refused."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from models import HybridDecoder, tiny_config
from models.checkpoint import load_params, save_params
from models.random_init import perturb


def params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_round_trip(tmp_path):
    saved = perturb(HybridDecoder(tiny_config("gemma3"), rngs=nnx.Rngs(0)), seed=3)
    save_params(saved, tmp_path / "ckpt")
    fresh = HybridDecoder(tiny_config("gemma3"), rngs=nnx.Rngs(1))
    assert not all(np.array_equal(a, b) for a, b in zip(params(saved), params(fresh)))
    load_params(fresh, tmp_path / "ckpt")
    assert all(np.array_equal(a, b) for a, b in zip(params(saved), params(fresh)))
    with pytest.raises(FileExistsError):
        save_params(saved, tmp_path / "ckpt")


def test_mismatched_architecture_is_refused(tmp_path):
    save_params(HybridDecoder(tiny_config("gemma3"), rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    other = HybridDecoder(tiny_config("llama"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not match"):
        load_params(other, tmp_path / "ckpt")
    wider = dataclasses.replace(tiny_config("gemma3"), mlp_dim=96)
    with pytest.raises(ValueError, match="does not match"):
        load_params(HybridDecoder(wider, rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError):
        load_params(other, tmp_path / "missing")
