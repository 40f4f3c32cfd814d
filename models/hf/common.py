"""What every Hugging Face family shares: errors, config.json reading, RoPE options,
and `Target`, the description of where one checkpoint tensor goes in the flax model."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable

import numpy as np

from models.config import FULL, SLIDING, RopeConfig


class CheckpointError(ValueError):
    """A checkpoint this code cannot load as it is (says which tensor or option)."""


def read_json(file: str | os.PathLike) -> dict:
    """A checkpoint's JSON file as a dict; CheckpointError (naming the file) if it is
    not a valid JSON object."""
    try:
        value = json.loads(pathlib.Path(file).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file} is not UTF-8 text: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(value).__name__}")
    return value


def read_config(path: str | os.PathLike) -> dict:
    """The checkpoint's config.json as a dict."""
    file = pathlib.Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"no config.json in {path}")
    return read_json(file)


def architecture(hf: dict) -> str:
    return (hf.get("architectures") or ["?"])[0]


def refuse_unless(hf: dict, **expected) -> None:
    """Raise if config.json asks for an option the model code lacks (key != expected)."""
    for key, value in expected.items():
        if hf.get(key, value) != value:
            raise CheckpointError(
                f"{architecture(hf)}: {key}={hf[key]!r} is not implemented (only {value!r})"
            )


def rope_config(hf: dict, layer_type: str | None = None) -> RopeConfig:
    """RoPE from config.json: `rope_parameters` (transformers >= 5; per layer type for
    Gemma-3) or the older `rope_theta` and `rope_scaling`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
    kind = params.get("rope_type", params.get("type"))
    if kind in (None, "default"):
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, scaling="linear", factor=params["factor"])
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            scaling="llama3",
            factor=params["factor"],
            low_freq_factor=params["low_freq_factor"],
            high_freq_factor=params["high_freq_factor"],
            original_max_position=params["original_max_position_embeddings"],
        )
    if kind == "yarn":
        if params.get("mscale") or params.get("mscale_all_dim"):
            raise CheckpointError("yarn rope with mscale / mscale_all_dim is not implemented")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise CheckpointError("partial_rotary_factor != 1 is not implemented")
        return RopeConfig(
            theta=theta,
            scaling="yarn",
            factor=params["factor"],
            original_max_position=params["original_max_position_embeddings"],
            beta_fast=params.get("beta_fast") or 32.0,
            beta_slow=params.get("beta_slow") or 1.0,
            truncate=params.get("truncate", True),
            attention_factor=params.get("attention_factor"),
        )
    raise CheckpointError(f"rope scaling {kind!r} is not implemented")


_ATTENTION_KINDS = {"full_attention": FULL, "sliding_attention": SLIDING}


def attention_kinds(hf: dict, names, window: int | None) -> tuple:
    """config.json's `layer_types` (full / sliding) as one kind per layer; refuses a
    list of the wrong length, other layer types, and sliding layers without a window."""
    arch, n = architecture(hf), hf["num_hidden_layers"]
    if len(names) != n:
        raise CheckpointError(f"{arch}: layer_types has {len(names)} entries for {n} layers")
    unknown = sorted(set(names) - set(_ATTENTION_KINDS))
    if unknown:
        raise CheckpointError(
            f"{arch}: layer_types {unknown} are not implemented (only {list(_ATTENTION_KINDS)})"
        )
    if "sliding_attention" in names and not window:
        raise CheckpointError(
            f"{arch}: layer_types has sliding_attention layers but no sliding_window "
            "(sliding_window is null or missing)"
        )
    return tuple(_ATTENTION_KINDS[name] for name in names)


Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Target:
    """One checkpoint tensor's destination: the flax parameter at `path`, after
    `transform` (numpy -> numpy), written whole or at `index` (e.g. one expert).

    `also_reads` names more checkpoint tensors the transform takes after the first
    (e.g. MXFP4 scales beside their blocks); they count as used."""

    path: Path
    transform: Callable[..., np.ndarray] | None = None
    index: tuple[int, ...] = ()
    also_reads: tuple[str, ...] = ()

    def apply(self, tensor: np.ndarray, *more: np.ndarray) -> np.ndarray:
        return tensor if self.transform is None else self.transform(tensor, *more)


def transpose(tensor: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> flax kernel [in, out] (last two axes)."""
    return np.swapaxes(tensor, -1, -2)


def linear(path: Path) -> list[Target]:
    """A torch Linear weight into the Dense at `path`."""
    return [Target((*path, "kernel"), transpose)]


def lm_head() -> list[Target]:
    """A torch LM head [vocab, d] into our `lm_head` [d, vocab]."""
    return [Target(("lm_head",), transpose)]


def param(path: Path) -> list[Target]:
    """A tensor stored as is (norm weights, biases, embeddings)."""
    return [Target(path)]


Targets = dict[str, list[Target]]
