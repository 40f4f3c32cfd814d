"""Save and restore a model's parameters as an orbax checkpoint.

The checkpoint holds the parameter tree only; the architecture comes from the config
you build the model with, and restoring checks every array's shape and dtype against
it (a checkpoint of another architecture is refused, nothing is half-loaded).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx


def save_params(model: nnx.Module, path: str | os.PathLike) -> None:
    """Write the model's nnx.Param state to the new directory `path` (absolute or not)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; orbax writes a new directory")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, nnx.state(model, nnx.Param))


def load_params(model: nnx.Module, path: str | os.PathLike, *, sharding=None) -> nnx.Module:
    """Restore parameters saved by `save_params` into `model` (in place); returns it.

    `model` may be abstract (``nnx.eval_shape``): nothing is allocated twice. sharding:
    one ``jax.sharding.Sharding`` for every array, a function of (param path "a/b/c",
    shape), or None (the default device)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no orbax checkpoint directory at {path}")
    name = getattr(getattr(model, "cfg", None), "name", type(model).__name__)
    target = nnx.state(model, nnx.Param)

    def spec(key_path, x):
        where = sharding
        if callable(sharding):
            names = [getattr(k, "key", getattr(k, "idx", None)) for k in key_path]
            where = sharding("/".join(str(n) for n in names if n is not None), x.shape)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where)

    abstract = jax.tree.map_with_path(spec, target)
    with ocp.StandardCheckpointer() as ckpt:
        try:
            restored = ckpt.restore(path, abstract)
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"checkpoint {path} does not match the parameters of {name}: {e}"
            ) from e
    for want, got in zip(jax.tree.leaves(abstract), jax.tree.leaves(restored)):
        if want.shape != got.shape or want.dtype != got.dtype:
            raise ValueError(
                f"checkpoint {path}: an array is {got.shape} {got.dtype}, {name} wants "
                f"{want.shape} {want.dtype}"
            )
    nnx.update(model, restored)
    return model
