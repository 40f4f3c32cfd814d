"""Load a Hugging Face checkpoint directory (config.json + *.safetensors) into the flax model.

Families so far: Llama 3.x (``LlamaForCausalLM``). Tensors are read one at a time
from their shard (``safetensors.safe_open``), transposed to the flax layout, cast to the
requested dtype and written into the model: the whole checkpoint is never held twice.
Every tensor is accounted for: a missing, extra or misshapen tensor raises, naming it.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax.numpy as jnp
from flax import nnx

from models.config import FULL, DecoderConfig, RopeConfig
from models.decoder import HybridDecoder

SUPPORTED = ("LlamaForCausalLM",)


class CheckpointError(ValueError):
    """A checkpoint this code cannot load as it is (says which tensor or option)."""


def read_config(path: str | os.PathLike) -> dict:
    file = pathlib.Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"no config.json in {path}")
    return json.loads(file.read_text())


def decoder_config(hf: dict, dtype: str = "float32") -> DecoderConfig:
    """The DecoderConfig of a Hugging Face config.json (as a dict)."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise CheckpointError(f"architecture {arch!r} is not supported; supported: {SUPPORTED}")
    for key, value in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if hf.get(key, value) != value:
            raise CheckpointError(f"{arch}: {key}={hf[key]!r} is not implemented")
    heads = hf["num_attention_heads"]
    return DecoderConfig(
        name=hf.get("_name_or_path") or hf.get("model_type", "llama"),
        layer_types=(FULL,) * hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        rope=_rope(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        dtype=dtype,
    )


def _rope(hf: dict) -> RopeConfig:
    """RoPE from config.json: `rope_parameters` (transformers >= 5) or `rope_theta` and
    `rope_scaling` (older files)."""
    scaling = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = scaling.get("rope_theta", hf.get("rope_theta", 10_000.0))
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, scaling="linear", factor=scaling["factor"])
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            scaling="llama3",
            factor=scaling["factor"],
            low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_position=scaling["original_max_position_embeddings"],
        )
    raise CheckpointError(f"rope scaling {kind!r} is not implemented")


def _targets(cfg: DecoderConfig) -> dict[str, tuple[tuple[str | int, ...], bool]]:
    """HF tensor name -> (path of the flax param, transpose?)."""
    names = {"model.embed_tokens.weight": (("embed",), False)}
    names["model.norm.weight"] = (("final_norm", "weight"), False)
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = (("lm_head",), True)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", ("blocks", i)
        for p in ("q", "k", "v", "o"):
            key = (*ours, "mixer", f"{p}_proj", "kernel")
            names[f"{hf}self_attn.{p}_proj.weight"] = (key, True)
        for p in ("gate", "up", "down"):
            names[f"{hf}mlp.{p}_proj.weight"] = ((*ours, "mlp", p, "kernel"), True)
        names[f"{hf}input_layernorm.weight"] = ((*ours, "pre_norm", "weight"), False)
        names[f"{hf}post_attention_layernorm.weight"] = ((*ours, "pre_mlp_norm", "weight"), False)
    return names


def _shards(path: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> its safetensors file (from the index, or the single file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
    from safetensors import safe_open

    with safe_open(single, "np") as f:
        return {name: single for name in f.keys()}


def load_hf_checkpoint(path: str | os.PathLike, *, dtype: str = "float32") -> HybridDecoder:
    """A HybridDecoder with the checkpoint's weights, cast to `dtype`."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    cfg = decoder_config(read_config(path), dtype)
    model = nnx.eval_shape(lambda: HybridDecoder(cfg, rngs=nnx.Rngs(0)))
    targets = _targets(cfg)
    shards = _shards(path)
    missing = sorted(set(targets) - set(shards))
    extra = sorted(n for n in set(shards) - set(targets) if not n.endswith("rotary_emb.inv_freq"))
    if missing or extra:
        raise CheckpointError(f"{path}: missing tensors {missing[:8]}, unexpected {extra[:8]}")
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)  # nested dict of (abstract) arrays
    by_file: dict[pathlib.Path, list[str]] = {}
    for name in targets:
        by_file.setdefault(shards[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, "np") as f:
            for name in names:
                key, transpose = targets[name]
                tensor = f.get_tensor(name)
                tensor = tensor.T if transpose else tensor
                parent = pure
                for part in key[:-1]:
                    parent = parent[part]
                want = parent[key[-1]].shape
                if tensor.shape != want:
                    raise CheckpointError(
                        f"{name}: expected shape {tuple(want)} (after transpose: {transpose}), "
                        f"found {tuple(tensor.shape)}"
                    )
                parent[key[-1]] = jnp.asarray(tensor, cfg.dtype)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model
