"""gpt-oss (`GptOssForCausalLM`): alternating sliding/full attention with sinks and
biases, YaRN RoPE, a top-k-then-softmax MoE of clamped-SwiGLU experts on every layer.

The experts are stored fused: `gate_up_proj` [E, d, 2f] with gate and up interleaved
on the last axis (gate = [..., ::2], up = [..., 1::2]), `down_proj` [E, f, d], both
already [in, out] (no transpose), and their biases [E, 2f], [E, d].
"""

from __future__ import annotations

from models.config import SLIDING, DecoderConfig, MoEConfig
from models.hf import mxfp4
from models.hf.common import (
    CheckpointError,
    Target,
    Targets,
    architecture,
    attention_kinds,
    linear,
    lm_head,
    param,
    refuse_unless,
    rope_config,
)

ARCHITECTURES = ("GptOssForCausalLM",)

_DEFAULT_THETA = 150_000.0  # GptOssConfig.default_theta
_DEFAULT_ROPE = dict(  # GptOssConfig's rope_parameters when config.json has none
    rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
    original_max_position_embeddings=4096,
)  # fmt: skip


def _layer_types(hf: dict) -> tuple:
    n = hf["num_hidden_layers"]
    names = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)
    ]  # transformers' default: even layers slide
    return attention_kinds(hf, names, hf.get("sliding_window"))


def _with_rope_defaults(hf: dict) -> dict:
    hf = {"rope_theta": _DEFAULT_THETA, **hf}
    if not (hf.get("rope_parameters") or hf.get("rope_scaling")):
        hf["rope_parameters"] = _DEFAULT_ROPE
    return hf


def decoder_config(hf: dict, dtype: str) -> DecoderConfig:
    method = _quantization(hf)
    if method not in (None, "mxfp4"):
        raise CheckpointError(
            f"{architecture(hf)}: quantization_config ({method}) is not implemented; "
            "mxfp4 experts are (dequantized on load), or dequantize to bf16/fp32 first"
        )
    refuse_unless(hf, hidden_act="silu")  # the experts' clamped SwiGLU is hard-coded
    layer_types = _layer_types(hf)
    window = hf.get("sliding_window") if SLIDING in layer_types else None
    heads = hf["num_attention_heads"]
    moe = MoEConfig(
        num_experts=hf["num_local_experts"],
        top_k=hf["num_experts_per_tok"],
        expert_dim=hf["intermediate_size"],
        router="topk_softmax",
        router_bias=True,
        expert_bias=True,
        activation="clamped_swiglu",
        swiglu_alpha=hf.get("swiglu_alpha", 1.702),
        swiglu_limit=hf.get("swiglu_limit", 7.0),
    )
    return DecoderConfig(
        name=hf.get("_name_or_path") or hf.get("model_type", "gpt_oss"),
        layer_types=layer_types,
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        window=window,
        rope=rope_config(_with_rope_defaults(hf)),
        sinks=True,
        attn_bias=bool(hf.get("attention_bias", True)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        moe=moe,
        moe_layers=tuple(range(len(layer_types))),
        max_seq_len=hf.get("max_position_embeddings", 131072),
        dtype=dtype,
    )


def _quantization(hf: dict) -> str | None:
    quant = hf.get("quantization_config")
    return quant.get("quant_method", "?") if quant else None


def _gate(t):  # gate_up [..., 2f] -> gate [..., f]
    return t[..., ::2]


def _up(t):  # gate_up [..., 2f] -> up [..., f]
    return t[..., 1::2]


def _mxfp4_rows(start: int):
    """Dequantize every other output row of MXFP4 gate_up blocks [E, 2f, G, 16] from
    `start` (0: gate, 1: up, interleaved): each half alone, never the whole tensor."""
    return lambda blocks, scales: mxfp4.dequantize(blocks[:, start::2], scales[:, start::2])


def _mxfp4_experts(experts: str, mlp: tuple) -> Targets:
    """MXFP4 experts (the published checkpoints): `*_blocks` + `*_scales`, dequantized
    while loading (see models/hf/mxfp4.py); the biases are stored unquantized."""
    gate_up, down = f"{experts}gate_up_proj", f"{experts}down_proj"
    scales = (f"{gate_up}_scales",)
    return {
        f"{gate_up}_blocks": [
            Target((*mlp, "gate"), _mxfp4_rows(0), also_reads=scales),
            Target((*mlp, "up"), _mxfp4_rows(1), also_reads=scales),
        ],
        f"{down}_blocks": [
            Target((*mlp, "down"), mxfp4.dequantize, also_reads=(f"{down}_scales",))
        ],
    }


def tensor_targets(cfg: DecoderConfig, hf: dict) -> Targets:
    names: Targets = {"model.embed_tokens.weight": param(("embed",))}
    names["model.norm.weight"] = param(("final_norm", "weight"))
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = lm_head()
    for i in range(cfg.num_layers):
        hf_, ours = f"model.layers.{i}.", ("blocks", i)
        attn, mlp = (*ours, "mixer"), (*ours, "mlp")
        for p in ("q", "k", "v", "o"):
            names[f"{hf_}self_attn.{p}_proj.weight"] = linear((*attn, f"{p}_proj"))
            if cfg.attn_bias:
                names[f"{hf_}self_attn.{p}_proj.bias"] = param((*attn, f"{p}_proj", "bias"))
        names[f"{hf_}self_attn.sinks"] = param((*attn, "sinks"))
        names[f"{hf_}input_layernorm.weight"] = param((*ours, "pre_norm", "weight"))
        names[f"{hf_}post_attention_layernorm.weight"] = param((*ours, "pre_mlp_norm", "weight"))
        names[f"{hf_}mlp.router.weight"] = linear((*mlp, "router"))
        names[f"{hf_}mlp.router.bias"] = param((*mlp, "router", "bias"))
        experts = f"{hf_}mlp.experts."
        if _quantization(hf) == "mxfp4":
            names.update(_mxfp4_experts(experts, mlp))
        else:
            names[f"{experts}gate_up_proj"] = [
                Target((*mlp, "gate"), _gate),
                Target((*mlp, "up"), _up),
            ]
            names[f"{experts}down_proj"] = param((*mlp, "down"))
        names[f"{experts}gate_up_proj_bias"] = [
            Target((*mlp, "gate_bias"), _gate),
            Target((*mlp, "up_bias"), _up),
        ]
        names[f"{experts}down_proj_bias"] = param((*mlp, "down_bias"))
    return names
