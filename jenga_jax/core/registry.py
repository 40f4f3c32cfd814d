"""Registry of real model architectures, so a layout can be built by name.

The facts come from `data/model_configs.json` (public config.json copies, with
their sources). Each family's rule maps a layer index to its kind.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

from jenga_jax.core import layer_kinds as lk
from jenga_jax.core.errors import UnknownModelError
from jenga_jax.core.layout import ModelLayout

_DATA = pathlib.Path(__file__).with_name("data") / "model_configs.json"

# Short registry name -> Hugging Face repository id in the data file.
MODEL_IDS: dict[str, str] = {
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-2-27b": "google/gemma-2-27b",
    "gemma-3-4b": "google/gemma-3-4b-it",
    "gemma-3-27b": "google/gemma-3-27b-it",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "llama-3.2-11b-vision": "meta-llama/Llama-3.2-11B-Vision",
    "ministral-8b": "mistralai/Ministral-8B-Instruct-2410",
    "jamba-1.5-mini": "ai21labs/AI21-Jamba-1.5-Mini",
    "llama-4-scout": "meta-llama/Llama-4-Scout-17B-16E",
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "gpt-oss-120b": "openai/gpt-oss-120b",
    "qwen3-next-80b": "Qwen/Qwen3-Next-80B-A3B",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the memory planner needs, read from the data file."""

    name: str
    hf_id: str
    raw: dict = dataclasses.field(repr=False, compare=False, hash=False)

    def __getitem__(self, key: str):
        return self.raw[key]

    def get(self, key: str, default=None):
        return self.raw.get(key, default)

    @property
    def num_layers(self) -> int:
        return self.raw["num_hidden_layers"]

    @property
    def image_tokens_per_image(self) -> int | None:
        """Encoder/image tokens of one image, for multimodal models (None otherwise)."""
        return self.raw.get("vision_max_tokens_per_image") or self.raw.get("mm_tokens_per_image")


@functools.lru_cache(maxsize=1)
def _raw_configs() -> dict[str, dict]:
    with open(_DATA) as f:
        data = json.load(f)
    data.pop("_about", None)
    return data


def _canonical(name: str) -> str:
    if name in MODEL_IDS:
        return name
    for short, hf_id in MODEL_IDS.items():
        if name == hf_id or name.lower() == hf_id.lower() or name.lower() == short:
            return short
    if name.lower().endswith("-it") and name.lower()[:-3] in MODEL_IDS:
        return name.lower()[:-3]
    raise UnknownModelError(f"unknown model {name!r}; registry names: {', '.join(MODEL_IDS)}")


def model_names() -> tuple[str, ...]:
    return tuple(MODEL_IDS)


def get_config(name: str) -> ModelConfig:
    short = _canonical(name)
    hf_id = MODEL_IDS[short]
    return ModelConfig(short, hf_id, _raw_configs()[hf_id])


def get_layout(
    name: str,
    *,
    kv_dtype: str = "bfloat16",
    state_dtype: str = "bfloat16",
    state_checkpoint_interval: int | None = None,
) -> ModelLayout:
    """The layout of a registry model: every layer's kind, from the published config.

    `state_checkpoint_interval` turns on prefix caching for state-space layers
    (a saved state every N tokens).
    """
    cfg = get_config(name)
    heads, head_dim = cfg["num_key_value_heads"], cfg["head_dim"]
    full = lk.full(heads, head_dim, kv_dtype)
    layer_kinds = [full] * cfg.num_layers

    def mark(indices, kind):
        for i in indices:
            layer_kinds[i] = kind

    if sliding := cfg.get("sliding_attention_layers"):
        mark(sliding, lk.sliding(cfg["sliding_window"], heads, head_dim, kv_dtype))
    if chunked := cfg.get("chunked_attention_layers"):
        mark(chunked, lk.chunked(cfg["attention_chunk_size"], heads, head_dim, kv_dtype))
    if cross := cfg.get("cross_attention_layers"):
        mark(cross, lk.cross(heads, head_dim, kv_dtype))
    state_elems = cfg.get("mamba_state_elems_per_layer_vllm") or cfg.get(
        "linear_state_elems_per_layer_vllm"
    )
    state_layers = cfg.get("mamba_layers") or cfg.get("linear_attention_layers")
    if state_layers:
        state_bytes = state_elems * lk.DTYPE_BYTES[state_dtype]
        mark(state_layers, lk.state(state_bytes, state_checkpoint_interval, state_dtype))
    return ModelLayout(cfg.name, tuple(layer_kinds))
