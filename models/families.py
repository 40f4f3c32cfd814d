"""Tiny configurations of each hybrid family in the registry (tests, demos).

Each keeps its family's layer-kind pattern and attention options at toy width; the
names map to the real models in `jenga_jax/core/data/model_configs.json`.
"""

from __future__ import annotations

from models.config import (
    CHUNKED,
    CROSS,
    FULL,
    SLIDING,
    STATE,
    DecoderConfig,
    MambaConfig,
    RopeConfig,
)

_LLAMA3_ROPE = RopeConfig(
    theta=500_000.0,
    scaling="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position=64,  # scaled down with the model so every band is exercised
)
_GEMMA = dict(norm="gemma", sandwich_norms=True, embed_scale=True, activation="gelu_tanh")

FAMILIES: dict[str, DecoderConfig] = {
    "llama": DecoderConfig(  # Llama-3.1: full attention, llama3 RoPE scaling
        name="tiny-llama", layer_types=(FULL,) * 4, rope=_LLAMA3_ROPE
    ),
    "gemma2": DecoderConfig(  # Gemma-2: 1:1 sliding/full, soft-caps, query_pre_attn_scalar
        name="tiny-gemma2",
        layer_types=(SLIDING, FULL) * 2,
        window=32,
        attn_soft_cap=50.0,
        final_soft_cap=30.0,
        query_pre_attn_scalar=32.0,
        tie_embeddings=True,
        **_GEMMA,
    ),
    "gemma3": DecoderConfig(  # Gemma-3: 5 local : 1 global, two RoPE bases, qk-norm
        name="tiny-gemma3",
        layer_types=(SLIDING,) * 5 + (FULL,),
        window=32,
        rope=RopeConfig(theta=1_000_000.0, scaling="linear", factor=8.0),
        local_rope=RopeConfig(theta=10_000.0),
        qk_norm=True,
        tie_embeddings=True,
        **_GEMMA,
    ),
    "ministral": DecoderConfig(  # Ministral-8B: 1 full then 3 sliding
        name="tiny-ministral",
        layer_types=(FULL, SLIDING, SLIDING, SLIDING),
        window=32,
        rope=RopeConfig(theta=100_000_000.0),
    ),
    "llama4": DecoderConfig(  # Llama-4: chunked local with RoPE, every 4th global NoPE
        name="tiny-llama4",
        layer_types=(CHUNKED, CHUNKED, CHUNKED, FULL),
        chunk=32,
        rope=None,
        local_rope=_LLAMA3_ROPE,
    ),
    "gpt-oss": DecoderConfig(  # gpt-oss: sliding 128 / full alternating, sinks, biases
        name="tiny-gpt-oss",
        layer_types=(SLIDING, FULL) * 2,
        window=128,
        sinks=True,
        attn_bias=True,
        rope=RopeConfig(theta=150_000.0),
    ),
    "llama-vision": DecoderConfig(  # Llama-3.2-Vision: gated cross attention to images
        name="tiny-llama-vision",
        layer_types=(FULL, FULL, FULL, CROSS, FULL),
        rope=_LLAMA3_ROPE,
        vision_dim=48,
    ),
    "jamba": DecoderConfig(  # Jamba: Mamba layers, one attention layer without RoPE
        name="tiny-jamba",
        layer_types=(STATE, STATE, FULL, STATE),
        rope=None,
        mamba=MambaConfig(d_state=8, d_conv=4, expand=2, dt_rank=8),
    ),
}


def tiny_config(family: str) -> DecoderConfig:
    """The tiny config of a family (see FAMILIES)."""
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family]
