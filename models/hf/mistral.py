"""Mistral (`MistralForCausalLM`) and Ministral (`MinistralForCausalLM`): the Llama
decoder with sliding-window attention.

Mistral applies `sliding_window` (absent: 4096, transformers' default) to every layer
when it is set (all SLIDING; null: all FULL); it ignores a `layer_types` key, as
transformers does. Ministral reads the pattern from `layer_types` (absent: all
sliding if `sliding_window` is set, else all full, like transformers' MinistralConfig).
"""

from __future__ import annotations

from models.config import FULL, SLIDING, DecoderConfig
from models.hf.common import (
    Targets,
    architecture,
    attention_kinds,
    lm_head,
    refuse_unless,
    rope_config,
)
from models.hf.llama import decoder_targets

ARCHITECTURES = ("MistralForCausalLM", "MinistralForCausalLM")


def _window(hf: dict) -> int | None:
    return hf.get("sliding_window", 4096)  # transformers' default when the key is absent


def _layer_types(hf: dict) -> tuple:
    n, window = hf["num_hidden_layers"], _window(hf)
    names = hf.get("layer_types") if architecture(hf) == "MinistralForCausalLM" else None
    if names is None:
        return ((SLIDING if window is not None else FULL),) * n
    return attention_kinds(hf, names, window)


def decoder_config(hf: dict, dtype: str) -> DecoderConfig:
    refuse_unless(hf, hidden_act="silu")
    heads = hf["num_attention_heads"]
    layer_types = _layer_types(hf)
    return DecoderConfig(
        name=hf.get("_name_or_path") or hf.get("model_type", "mistral"),
        layer_types=layer_types,
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        window=_window(hf) if SLIDING in layer_types else None,
        rope=rope_config(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=hf.get("max_position_embeddings", 4096 * 32),
        dtype=dtype,
    )


def tensor_targets(cfg: DecoderConfig, hf: dict) -> Targets:
    names = decoder_targets(cfg)
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = lm_head()
    return names
