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
    CheckpointError,
    Target,
    Targets,
    architecture,
    refuse_unless,
    rope_config,
    transpose,
)
from models.hf.llama import decoder_targets

ARCHITECTURES = ("MistralForCausalLM", "MinistralForCausalLM")

_KINDS = {"full_attention": FULL, "sliding_attention": SLIDING}


def _window(hf: dict) -> int | None:
    return hf.get("sliding_window", 4096)  # transformers' default when the key is absent


def _layer_types(hf: dict) -> tuple:
    n, window = hf["num_hidden_layers"], _window(hf)
    names = hf.get("layer_types") if architecture(hf) == "MinistralForCausalLM" else None
    if names is None:
        return ((SLIDING if window is not None else FULL),) * n
    if len(names) != n:
        raise CheckpointError(f"layer_types has {len(names)} entries for {n} layers")
    unknown = sorted(set(names) - set(_KINDS))
    if unknown:
        raise CheckpointError(f"layer_types {unknown} are not implemented (only {list(_KINDS)})")
    if "sliding_attention" in names and window is None:
        raise CheckpointError("layer_types has sliding_attention layers but sliding_window is null")
    return tuple(_KINDS[name] for name in names)


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
        names["lm_head.weight"] = [Target(("lm_head",), transpose)]
    return names
