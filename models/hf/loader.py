"""Load a Hugging Face checkpoint directory (config.json + *.safetensors) into the flax model.

Tensors are read one at a time from their shard (`safetensors.safe_open`), mapped by
the family's targets, cast to the requested dtype and placed with the requested
sharding: the whole checkpoint is never held twice. Every checkpoint tensor and every
model parameter is accounted for; a missing, extra or misshapen tensor raises, naming it.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.decoder import HybridDecoder
from models.hf.common import CheckpointError, Path, read_config, read_json
from models.hf.registry import decoder_config, family_of

_ALWAYS_IGNORED = (r".*rotary_emb\.inv_freq$",)

# One sharding for every parameter, or a function of (param path "a/b/c", shape).
Sharding = jax.sharding.Sharding | Callable[[str, tuple[int, ...]], jax.sharding.Sharding]


def _shards(path: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> its safetensors file (from the index, or the single file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index)["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
    from safetensors import safe_open

    with safe_open(single, "np") as f:
        return {name: single for name in f.keys()}


def _lookup(tree: dict, path: Path):
    for part in path:
        tree = tree[part]
    return tree


def _assign(tree: dict, path: Path, value) -> None:
    _lookup(tree, path[:-1])[path[-1]] = value


def load_hf_checkpoint(
    path: str | os.PathLike, *, dtype: str = "float32", sharding: Sharding | None = None
) -> HybridDecoder:
    """A HybridDecoder with the checkpoint's weights, cast to `dtype`, placed by `sharding`."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    hf = read_config(path)
    family = family_of(hf)
    cfg = decoder_config(hf, dtype)
    model = nnx.eval_shape(lambda: HybridDecoder(cfg, rngs=nnx.Rngs(0)))
    targets = family.tensor_targets(cfg, hf)
    shards = _shards(path)
    ignored = [re.compile(p) for p in (*_ALWAYS_IGNORED, *getattr(family, "IGNORED", ()))]
    read_too = {n for ts in targets.values() for t in ts for n in t.also_reads}
    used = set(targets) | read_too
    missing = sorted(used - set(shards))
    extra = sorted(n for n in set(shards) - used if not any(p.match(n) for p in ignored))
    if missing or extra:
        raise CheckpointError(f"{path}: missing tensors {missing[:8]}, unexpected {extra[:8]}")

    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)  # nested dict of abstract arrays, filled below
    np_dtype = jnp.dtype(dtype)
    pending_slices: dict[Path, int] = {}  # params written in slices: slices still to come
    for tensor_targets in targets.values():
        for target in tensor_targets:
            if target.index:
                pending_slices[target.path] = pending_slices.get(target.path, 0) + 1
    buffers: dict[Path, np.ndarray] = {}
    loaded: set[Path] = set()

    def read(name: str) -> np.ndarray:  # a tensor from whichever shard holds it
        with safe_open(shards[name], "np") as f:
            return f.get_tensor(name)

    def place(param_path: Path, array: np.ndarray) -> None:
        key = "/".join(map(str, param_path))
        if sharding is None:
            placed = jnp.asarray(array)
        else:
            where = sharding(key, array.shape) if callable(sharding) else sharding
            placed = jax.device_put(array, where)
        _assign(pure, param_path, placed)
        loaded.add(param_path)

    by_file: dict[pathlib.Path, list[str]] = {}
    for name in targets:
        by_file.setdefault(shards[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, "np") as f:
            for name in names:
                raw = f.get_tensor(name)
                for target in targets[name]:
                    want = _lookup(pure, target.path).shape
                    tensor = target.apply(raw, *(read(n) for n in target.also_reads))
                    slot = tuple(want[len(target.index) :])
                    if tuple(tensor.shape) != slot:
                        raise CheckpointError(
                            f"{name}: expected shape {slot} (as mapped to "
                            f"{'/'.join(map(str, target.path))}), found {tuple(tensor.shape)} "
                            f"(stored {tuple(raw.shape)})"
                        )
                    if not target.index:
                        place(target.path, tensor.astype(np_dtype))
                        continue
                    buffer = buffers.setdefault(target.path, np.zeros(want, np_dtype))
                    buffer[target.index] = tensor
                    pending_slices[target.path] -= 1
                    if pending_slices[target.path] == 0:
                        place(target.path, buffers.pop(target.path))
                del raw
    unset = [
        "/".join(map(str, p))
        for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]
        if tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p) not in loaded
    ]
    if unset:
        raise CheckpointError(f"{path}: no checkpoint tensor maps to parameters {unset[:8]}")
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model
