"""Gemma-2 (`Gemma2ForCausalLM`) and Gemma-3 text (`Gemma3ForCausalLM`, and the language
model of `Gemma3ForConditionalGeneration`, its vision tower left unused).

Both: norms scaling by (1 + w) in float32, sandwich norms around attention and MLP,
embeddings times sqrt(hidden), tanh-GELU, scale query_pre_attn_scalar ** -0.5, sliding
and full layers from `layer_types` (absent: Gemma-2 alternates sliding/full, Gemma-3
has one full layer in every `sliding_window_pattern`, default 6). Gemma-2 soft-caps
attention and final logits; Gemma-3 adds q/k norms and a second RoPE (base 10k) on
sliding layers, and (like transformers) ignores `attn_logit_softcapping`, and
`final_logit_softcapping` too in the image model.
"""

from __future__ import annotations

from models.config import SLIDING, DecoderConfig, RopeConfig
from models.hf.common import (
    CheckpointError,
    Targets,
    architecture,
    attention_kinds,
    linear,
    lm_head,
    param,
    refuse_unless,
    rope_config,
)

ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
IGNORED = (r"^vision_tower\.", r"^multi_modal_projector\.")  # Gemma-3's image encoder

_MULTIMODAL = "Gemma3ForConditionalGeneration"
# transformers' tanh approximations of GELU (same formula; the model uses the tanh GELU)
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python_tanh")

# transformers' Gemma2Config / Gemma3TextConfig defaults (a config.json may omit keys:
# gemma-3-4b-it's text_config gives only sizes and the window).
_COMMON = dict(
    hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
    query_pre_attn_scalar=256, sliding_window=4096, use_bidirectional_attention=False,
)  # fmt: skip
_DEFAULTS = {
    "gemma2": dict(
        _COMMON, vocab_size=256_000, max_position_embeddings=8192,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
    ),
    "gemma3": dict(
        _COMMON, vocab_size=262_208, max_position_embeddings=131_072,
        final_logit_softcapping=None, attn_logit_softcapping=None,
    ),
}  # fmt: skip


def _text_config(hf: dict) -> tuple[str, dict]:
    """("gemma2" | "gemma3", the text model's config with transformers' defaults)."""
    arch = architecture(hf)
    version = "gemma2" if arch == "Gemma2ForCausalLM" else "gemma3"
    text = hf
    if arch == _MULTIMODAL:
        text = {**hf["text_config"], "architectures": hf["architectures"]}
        text["tie_word_embeddings"] = hf.get("tie_word_embeddings", True)  # the top level's
    return version, {**_DEFAULTS[version], **text}


def _layer_types(version: str, text: dict) -> tuple:
    n = text["num_hidden_layers"]
    names = text.get("layer_types")
    if names is None:
        every = 2  # Gemma-2: sliding, full, sliding, ...; Gemma-3: one full in `every`
        if version == "gemma3":
            every = text.get("sliding_window_pattern") or text.get("_sliding_window_pattern") or 6
        names = [
            "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)
        ]
    return attention_kinds(text, names, text["sliding_window"])


def _gemma3_ropes(text: dict) -> tuple[RopeConfig, RopeConfig]:
    """(full layers' RoPE, sliding layers' RoPE): `rope_parameters` per layer type
    (transformers >= 5), or the older rope_theta / rope_scaling / rope_local_base_freq."""
    params = text.get("rope_parameters") or {}
    if "full_attention" not in params and "sliding_attention" not in params:
        full = dict(text.get("rope_scaling") or params)  # old form: scaling for full layers
        full.setdefault("rope_theta", text.get("rope_theta", 1_000_000.0))
        local = {"rope_type": "default", "rope_theta": text.get("rope_local_base_freq", 10_000.0)}
        params = {"full_attention": full, "sliding_attention": local}
    defaults = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
    params = {
        kind: {"rope_theta": theta, **(params.get(kind) or {"rope_type": "default"})}
        for kind, theta in defaults.items()
    }
    wrapped = {"rope_parameters": params}
    return rope_config(wrapped, "full_attention"), rope_config(wrapped, "sliding_attention")


def decoder_config(hf: dict, dtype: str) -> DecoderConfig:
    version, text = _text_config(hf)
    if text["use_bidirectional_attention"]:  # Gemma-2 default None, Gemma-3 False
        refuse_unless(text, use_bidirectional_attention=False)
    act = text["hidden_activation"]
    if act not in _TANH_GELUS:
        raise CheckpointError(
            f"{architecture(hf)}: hidden_activation={act!r} is not implemented "
            f"(only the tanh GELU: {_TANH_GELUS})"
        )
    layer_types = _layer_types(version, text)
    if version == "gemma2":
        rope, local_rope = rope_config(text), None
        attn_cap = text["attn_logit_softcapping"]
    else:
        rope, local_rope = _gemma3_ropes(text)
        attn_cap = None  # transformers' Gemma-3 attention does not apply it
    final_cap = text["final_logit_softcapping"]
    if architecture(hf) == _MULTIMODAL:
        final_cap = None  # Gemma3ForConditionalGeneration does not apply it either
    heads = text["num_attention_heads"]
    return DecoderConfig(
        name=hf.get("_name_or_path") or text.get("model_type", version),
        layer_types=layer_types,
        vocab_size=text["vocab_size"],
        d_model=text["hidden_size"],
        num_heads=heads,
        num_kv_heads=text["num_key_value_heads"] or heads,
        head_dim=text["head_dim"],
        mlp_dim=text["intermediate_size"],
        window=text["sliding_window"] if SLIDING in layer_types else None,
        rope=rope,
        local_rope=local_rope,
        attn_soft_cap=attn_cap,
        final_soft_cap=final_cap,
        query_pre_attn_scalar=text["query_pre_attn_scalar"],
        attn_bias=bool(text["attention_bias"]),
        qk_norm=version == "gemma3",
        norm="gemma",
        sandwich_norms=True,
        embed_scale=True,
        activation="gelu_tanh",
        tie_embeddings=bool(text["tie_word_embeddings"]),
        norm_eps=text["rms_norm_eps"],
        max_seq_len=text["max_position_embeddings"],
        dtype=dtype,
    )


_NORMS = {  # transformers' decoder-layer norm -> ours
    "input_layernorm": "pre_norm",
    "post_attention_layernorm": "post_norm",
    "pre_feedforward_layernorm": "pre_mlp_norm",
    "post_feedforward_layernorm": "post_mlp_norm",
}


def tensor_targets(cfg: DecoderConfig, hf: dict) -> Targets:
    multimodal = architecture(hf) == _MULTIMODAL
    # transformers 5 saves Gemma3ForConditionalGeneration in the hub's (older) names
    prefix = "language_model.model." if multimodal else "model."
    names: Targets = {f"{prefix}embed_tokens.weight": param(("embed",))}
    names[f"{prefix}norm.weight"] = param(("final_norm", "weight"))
    for i in range(cfg.num_layers):
        hf_layer, ours = f"{prefix}layers.{i}.", ("blocks", i)
        for p in ("q", "k", "v", "o"):
            proj = (*ours, "mixer", f"{p}_proj")
            names[f"{hf_layer}self_attn.{p}_proj.weight"] = linear(proj)
            if cfg.attn_bias:
                names[f"{hf_layer}self_attn.{p}_proj.bias"] = param((*proj, "bias"))
        if cfg.qk_norm:
            for p in ("q", "k"):
                names[f"{hf_layer}self_attn.{p}_norm.weight"] = param(
                    (*ours, "mixer", f"{p}_norm", "weight")
                )
        for p in ("gate", "up", "down"):
            names[f"{hf_layer}mlp.{p}_proj.weight"] = linear((*ours, "mlp", p))
        for theirs, norm in _NORMS.items():
            names[f"{hf_layer}{theirs}.weight"] = param((*ours, norm, "weight"))
    if not cfg.tie_embeddings:
        head = "language_model.lm_head.weight" if multimodal else "lm_head.weight"
        names[head] = lm_head()
    return names
