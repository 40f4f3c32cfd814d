"""Llama 3.x (`LlamaForCausalLM`): full attention, GQA, llama3 RoPE scaling."""

from __future__ import annotations

from models.config import FULL, DecoderConfig
from models.hf.common import (
    Targets,
    linear,
    lm_head,
    param,
    refuse_unless,
    rope_config,
)

ARCHITECTURES = ("LlamaForCausalLM",)


def decoder_config(hf: dict, dtype: str) -> DecoderConfig:
    refuse_unless(hf, attention_bias=False, mlp_bias=False, hidden_act="silu")
    heads = hf["num_attention_heads"]
    return DecoderConfig(
        name=hf.get("_name_or_path") or hf.get("model_type", "llama"),
        layer_types=(FULL,) * hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        rope=rope_config(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        dtype=dtype,
    )


def decoder_targets(cfg: DecoderConfig, prefix: str = "model.") -> Targets:
    """The tensors of a Llama-style decoder (embeddings, attention, gated MLP, norms)."""
    names: Targets = {f"{prefix}embed_tokens.weight": param(("embed",))}
    names[f"{prefix}norm.weight"] = param(("final_norm", "weight"))
    for i in range(cfg.num_layers):
        hf, ours = f"{prefix}layers.{i}.", ("blocks", i)
        for p in ("q", "k", "v", "o"):
            names[f"{hf}self_attn.{p}_proj.weight"] = linear((*ours, "mixer", f"{p}_proj"))
        for p in ("gate", "up", "down"):
            names[f"{hf}mlp.{p}_proj.weight"] = linear((*ours, "mlp", p))
        names[f"{hf}input_layernorm.weight"] = param((*ours, "pre_norm", "weight"))
        names[f"{hf}post_attention_layernorm.weight"] = param((*ours, "pre_mlp_norm", "weight"))
    return names


def tensor_targets(cfg: DecoderConfig, hf: dict) -> Targets:
    names = decoder_targets(cfg)
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = lm_head()
    return names
