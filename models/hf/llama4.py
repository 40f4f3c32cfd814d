"""Llama-4 text (`Llama4ForCausalLM`; the language model of
`Llama4ForConditionalGeneration`, its vision tower and projector unused).

iRoPE: layers with RoPE (`no_rope_layers[i] == 1`) attend within chunks of
`attention_chunk_size` tokens; the others are global NoPE layers whose queries get the
temperature `log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1`. RoPE rotates
adjacent pairs (complex form), and `use_qk_norm` divides q and k by their RMS after it
(no weight). The MoE MLP: top-k logits, sigmoid, the score scales the expert's input;
a shared expert is added; experts are stored fused, `gate_up_proj` [E, d, 2f] (gate
first) and `down_proj` [E, f, d]. Dense layers' MLPs are `intermediate_size_mlp` wide.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from models.config import CHUNKED, FULL, DecoderConfig, MoEConfig
from models.hf.common import (
    CheckpointError,
    Target,
    Targets,
    architecture,
    linear,
    lm_head,
    param,
    refuse_unless,
    rope_config,
)

ARCHITECTURES = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
IGNORED = (r"vision_model\.", r"multi_modal_projector\.")  # image features are not used
_KINDS = {"chunked_attention": CHUNKED, "full_attention": FULL}
_MULTIMODAL = "Llama4ForConditionalGeneration"


def text_config(hf: dict) -> dict:
    """The text model's config (nested in `text_config` for the multimodal class)."""
    if architecture(hf) != _MULTIMODAL:
        return hf
    refuse_unless(hf, tie_word_embeddings=False)
    text = {**hf["text_config"], "architectures": hf["architectures"]}
    refuse_unless(text, tie_word_embeddings=False)
    return text


def _layers(hf: dict) -> tuple[list[int], list[str], tuple[int, ...]]:
    """(no_rope_layers, layer_types, moe_layers) with transformers' defaults."""
    n = hf["num_hidden_layers"]
    interval = hf.get("no_rope_layer_interval", 4)
    no_rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    types = hf.get("layer_types") or [
        "chunked_attention" if r else "full_attention" for r in no_rope
    ]
    step = hf.get("interleave_moe_layer_step", 1)
    moe = hf.get("moe_layers")
    moe = tuple(range(step - 1, n, step)) if moe is None else tuple(moe)
    for key, values in (("no_rope_layers", no_rope), ("layer_types", types)):
        if len(values) < n:
            raise CheckpointError(f"{architecture(hf)}: {key} has {len(values)} entries, not {n}")
    return list(no_rope[:n]), list(types[:n]), moe


def decoder_config(hf: dict, dtype: str) -> DecoderConfig:
    hf = text_config(hf)
    arch = architecture(hf)
    refuse_unless(hf, hidden_act="silu", quantization_config=None)
    no_rope, types, moe_layers = _layers(hf)
    if unknown := set(types) - set(_KINDS):
        raise CheckpointError(f"{arch}: layer_types {sorted(unknown)} are not implemented")
    if any(bool(r) != (t == "chunked_attention") for r, t in zip(no_rope, types)):
        raise CheckpointError(
            f"{arch}: layer_types {types} with no_rope_layers {no_rope} is not implemented "
            "(RoPE exactly on the chunked_attention layers)"
        )
    kinds = tuple(_KINDS[t] for t in types)
    chunk = hf.get("attention_chunk_size", 8192) if CHUNKED in kinds else None
    if CHUNKED in kinds and not chunk:
        raise CheckpointError(f"{arch}: chunked_attention layers need attention_chunk_size")
    heads, d = hf["num_attention_heads"], hf["hidden_size"]
    f = hf.get("intermediate_size", 8192)
    moe = None
    if moe_layers:
        moe = MoEConfig(
            num_experts=hf.get("num_local_experts", 16),
            top_k=hf.get("num_experts_per_tok", 1),
            expert_dim=f,
            router="topk_sigmoid",
            weight_input=True,
            shared_dim=f,
        )
    temperature = None
    if hf.get("attn_temperature_tuning", True):  # an int (4) in some published configs
        temperature = (float(hf.get("floor_scale", 8192)), float(hf.get("attn_scale", 0.1)))
    rope = rope_config({"rope_theta": 500_000.0, **hf})  # Llama-4's default theta
    return DecoderConfig(
        name=hf.get("_name_or_path") or hf.get("model_type", "llama4"),
        layer_types=kinds,
        vocab_size=hf["vocab_size"],
        d_model=d,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim", 128) or d // heads,
        mlp_dim=hf.get("intermediate_size_mlp", 16384),
        chunk=chunk,
        rope=None,  # global layers are NoPE
        local_rope=dataclasses.replace(rope, interleaved=True),
        attn_bias=bool(hf.get("attention_bias", False)),
        rope_qk_l2_norm=bool(hf.get("use_qk_norm", True)),
        nope_temperature=temperature,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        moe=moe,
        moe_layers=moe_layers,
        max_seq_len=hf.get("max_position_embeddings", 4096 * 32),
        dtype=dtype,
    )


def _half(index: int):
    """[E, d, 2f] gate_up_proj -> its gate (0) or up (1) half [E, d, f]."""

    def take(tensor: np.ndarray) -> np.ndarray:
        if tensor.shape[-1] % 2:
            raise CheckpointError(f"gate_up_proj's last axis is odd: {tensor.shape}")
        return np.split(tensor, 2, axis=-1)[index]

    return take


def tensor_targets(cfg: DecoderConfig, hf: dict) -> Targets:
    multimodal = architecture(hf) == _MULTIMODAL
    prefix = "language_model.model." if multimodal else "model."
    names: Targets = {f"{prefix}embed_tokens.weight": param(("embed",))}
    names[f"{prefix}norm.weight"] = param(("final_norm", "weight"))
    for i in range(cfg.num_layers):
        hf_layer, ours = f"{prefix}layers.{i}.", ("blocks", i)
        for p in ("q", "k", "v", "o"):
            attn = f"{hf_layer}self_attn.{p}_proj."
            names[f"{attn}weight"] = linear((*ours, "mixer", f"{p}_proj"))
            if cfg.attn_bias:
                names[f"{attn}bias"] = param((*ours, "mixer", f"{p}_proj", "bias"))
        names[f"{hf_layer}input_layernorm.weight"] = param((*ours, "pre_norm", "weight"))
        names[f"{hf_layer}post_attention_layernorm.weight"] = param(
            (*ours, "pre_mlp_norm", "weight")
        )
        ff, mlp = f"{hf_layer}feed_forward.", (*ours, "mlp")
        if i not in cfg.moe_layers:
            for p in ("gate", "up", "down"):
                names[f"{ff}{p}_proj.weight"] = linear((*mlp, p))
            continue
        names[f"{ff}router.weight"] = linear((*mlp, "router"))
        names[f"{ff}experts.gate_up_proj"] = [
            Target((*mlp, "gate"), _half(0)),
            Target((*mlp, "up"), _half(1)),
        ]
        names[f"{ff}experts.down_proj"] = param((*mlp, "down"))
        for p in ("gate", "up", "down"):
            names[f"{ff}shared_expert.{p}_proj.weight"] = linear((*mlp, f"shared_{p}"))
    if not cfg.tie_embeddings:
        head = "language_model.lm_head.weight" if multimodal else "lm_head.weight"
        names[head] = lm_head()
    return names
