"""Load a model from a directory: a Hugging Face checkpoint (config.json + safetensors)
or one written by ``python -m models.hf.convert`` (config.json + orbax parameters).

Either way the architecture comes from config.json (``models.hf.decoder_config``), so
the model and the memory planner's layout (``model.cfg.layout()``) share one source.
"""

from __future__ import annotations

import os
import pathlib

from flax import nnx

from models.checkpoint import load_params
from models.decoder import HybridDecoder
from models.hf import CheckpointError, decoder_config, load_hf_checkpoint, read_config
from models.hf.common import read_json

ORBAX_PARAMS = "orbax_params"  # the converted directory's parameter checkpoint
CONVERTED_INFO = "jenga_jax.json"  # {"dtype": ..., "source": ...} of a converted directory
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def is_converted(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / ORBAX_PARAMS).is_dir()


def checkpoint_dtype(path: str | os.PathLike) -> str:
    """The dtype the directory stores (converted: as saved; HF: config.json's, else float32)."""
    path = pathlib.Path(path)
    if is_converted(path):
        info = read_json(path / CONVERTED_INFO)
        if info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path / CONVERTED_INFO} names no known dtype: {info}")
        return info["dtype"]
    hf = read_config(path)
    return _DTYPES.get(hf.get("dtype") or hf.get("torch_dtype"), "float32")


def load_pretrained(
    path: str | os.PathLike, *, dtype: str | None = None, sharding=None
) -> HybridDecoder:
    """The model stored in `path`, in `dtype` (None: as stored), placed by `sharding`
    (one Sharding, a function of (param path, shape), or None)."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    stored = checkpoint_dtype(path)
    dtype = dtype or stored
    if not is_converted(path):
        return load_hf_checkpoint(path, dtype=dtype, sharding=sharding)
    if dtype != stored:
        raise CheckpointError(
            f"{path} stores {stored} parameters; convert again with --dtype {dtype}"
        )
    cfg = decoder_config(read_config(path), stored)
    model = nnx.eval_shape(lambda: HybridDecoder(cfg, rngs=nnx.Rngs(0)))
    return load_params(model, path / ORBAX_PARAMS, sharding=sharding)
