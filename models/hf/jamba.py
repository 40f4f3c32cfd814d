"""Jamba (`JambaForCausalLM`): Mamba-1 layers with an attention layer every
`attn_layer_period` (no RoPE), a sparse MoE MLP every `expert_layer_period`.

The MoE router is a softmax over all experts, then the top k, not renormalised; the
experts are saved one by one (`feed_forward.experts.{e}.gate_proj.weight`, ...) and
written into our stacked [E, d, f] parameters.
"""

from __future__ import annotations

import math

import numpy as np

from models.config import FULL, STATE, DecoderConfig, MambaConfig, MoEConfig
from models.hf.common import (
    CheckpointError,
    Target,
    Targets,
    architecture,
    linear,
    lm_head,
    param,
    refuse_unless,
    transpose,
)

ARCHITECTURES = ("JambaForCausalLM",)


# JambaConfig's defaults when config.json leaves a key out.
_DEFAULTS = dict(attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2,
                 expert_layer_offset=1, num_experts=16)  # fmt: skip


def _per_layer(hf: dict, key: str, period: str, offset: str, hit, miss) -> list:
    """`hf[key]` if config.json lists it, else `hit` where i % period == offset."""
    n = hf["num_hidden_layers"]
    if key in hf:
        values = list(hf[key])
        if len(values) != n:
            raise CheckpointError(f"{architecture(hf)}: {key} has {len(values)} entries, not {n}")
        return values
    p, o = hf.get(period, _DEFAULTS[period]), hf.get(offset, _DEFAULTS[offset])
    if not isinstance(p, int) or not isinstance(o, int) or not 0 <= o < p:
        raise CheckpointError(f"{architecture(hf)}: need 0 <= {offset} ({o}) < {period} ({p})")
    return [hit if i % p == o else miss for i in range(n)]


def layer_types(hf: dict) -> tuple:
    kinds = {"attention": FULL, "mamba": STATE}
    blocks = _per_layer(
        hf, "layers_block_type", "attn_layer_period", "attn_layer_offset", "attention", "mamba"
    )
    if unknown := set(blocks) - set(kinds):
        raise CheckpointError(f"{architecture(hf)}: unknown layers_block_type {sorted(unknown)}")
    return tuple(kinds[b] for b in blocks)


def moe_layers(hf: dict) -> tuple[int, ...]:
    """Layers whose MLP is the sparse MoE block (num_experts == 1: none)."""
    e = hf.get("num_experts", _DEFAULTS["num_experts"])
    counts = _per_layer(
        hf, "layers_num_experts", "expert_layer_period", "expert_layer_offset", e, 1
    )
    if set(counts) - {1, e}:
        raise CheckpointError(f"{architecture(hf)}: layers_num_experts must be 1 or {e}: {counts}")
    return tuple(i for i, c in enumerate(counts) if c > 1)


def decoder_config(hf: dict, dtype: str) -> DecoderConfig:
    # hidden_act is also the Mamba conv's activation; the projections' biases and a
    # conv without bias are options the mixer here lacks.
    refuse_unless(
        hf, hidden_act="silu", mamba_proj_bias=False, mamba_conv_bias=True, sliding_window=None
    )
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    dt_rank = hf.get("mamba_dt_rank", "auto")
    types, moe = layer_types(hf), moe_layers(hf)
    return DecoderConfig(
        name=hf.get("_name_or_path") or hf.get("model_type", "jamba"),
        layer_types=types,
        vocab_size=hf["vocab_size"],
        d_model=d,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or d // heads,
        mlp_dim=hf["intermediate_size"],
        rope=None,  # Jamba's attention has no positional encoding
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mamba=MambaConfig(
            d_state=hf.get("mamba_d_state", 16),
            d_conv=hf.get("mamba_d_conv", 4),
            expand=hf.get("mamba_expand", 2),
            dt_rank=math.ceil(d / 16) if dt_rank == "auto" else dt_rank,
        )
        if STATE in types
        else None,
        moe=MoEConfig(
            num_experts=hf.get("num_experts", _DEFAULTS["num_experts"]),
            top_k=hf.get("num_experts_per_tok", 2),
            expert_dim=hf["intermediate_size"],
            router="softmax",
        )
        if moe
        else None,
        moe_layers=moe,
        max_seq_len=hf.get("max_position_embeddings", 262_144),
        dtype=dtype,
    )


def _conv(tensor: np.ndarray) -> np.ndarray:
    """torch depthwise Conv1d weight [d_inner, 1, d_conv] -> [d_inner, d_conv]."""
    if tensor.ndim != 3 or tensor.shape[1] != 1:
        raise CheckpointError(f"conv1d.weight must be [d_inner, 1, d_conv], got {tensor.shape}")
    return tensor[:, 0, :]


def _mamba_targets(hf: str, ours: tuple) -> Targets:
    m, mixer = f"{hf}mamba.", (*ours, "mixer")
    return {
        f"{m}in_proj.weight": [Target((*mixer, "in_proj"), transpose)],
        f"{m}conv1d.weight": [Target((*mixer, "conv_w"), _conv)],
        f"{m}conv1d.bias": param((*mixer, "conv_b")),
        f"{m}x_proj.weight": [Target((*mixer, "x_proj"), transpose)],
        f"{m}dt_proj.weight": [Target((*mixer, "dt_proj_w"), transpose)],
        f"{m}dt_proj.bias": param((*mixer, "dt_proj_b")),
        f"{m}A_log": param((*mixer, "A_log")),
        f"{m}D": param((*mixer, "D")),
        f"{m}out_proj.weight": [Target((*mixer, "out_proj"), transpose)],
        f"{m}dt_layernorm.weight": param((*mixer, "dt_norm")),
        f"{m}b_layernorm.weight": param((*mixer, "b_norm")),
        f"{m}c_layernorm.weight": param((*mixer, "c_norm")),
    }


def _ffn_targets(cfg: DecoderConfig, hf: str, ours: tuple, layer: int) -> Targets:
    ff, mlp = f"{hf}feed_forward.", (*ours, "mlp")
    if layer not in cfg.moe_layers:
        return {f"{ff}{p}_proj.weight": linear((*mlp, p)) for p in ("gate", "up", "down")}
    names: Targets = {f"{ff}router.weight": linear((*mlp, "router"))}
    for e in range(cfg.moe.num_experts):
        for p in ("gate", "up", "down"):  # [out, in] -> slice e of [E, in, out]
            names[f"{ff}experts.{e}.{p}_proj.weight"] = [Target((*mlp, p), transpose, (e,))]
    return names


def tensor_targets(cfg: DecoderConfig, hf: dict) -> Targets:
    names: Targets = {
        "model.embed_tokens.weight": param(("embed",)),
        "model.final_layernorm.weight": param(("final_norm", "weight")),
    }
    for i, kind in enumerate(cfg.layer_types):
        pre, ours = f"model.layers.{i}.", ("blocks", i)
        if kind is STATE:
            names.update(_mamba_targets(pre, ours))
        else:
            for p in ("q", "k", "v", "o"):
                names[f"{pre}self_attn.{p}_proj.weight"] = linear((*ours, "mixer", f"{p}_proj"))
        names.update(_ffn_targets(cfg, pre, ours, i))
        names[f"{pre}input_layernorm.weight"] = param((*ours, "pre_norm", "weight"))
        names[f"{pre}pre_ff_layernorm.weight"] = param((*ours, "pre_mlp_norm", "weight"))
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = lm_head()
    return names
