"""Rotary position embeddings: default, linear, llama3 and YaRN frequency scaling.

Rotation in the Hugging Face convention: a head vector is split in two halves
``[x1, x2]`` and rotated as ``[x1 cos - x2 sin, x2 cos + x1 sin]`` with one angle per
frequency, ``angle = position * inv_freq``. With ``RopeConfig.interleaved`` (Llama-4's
complex form) the pairs are adjacent elements ``(x[2i], x[2i+1])`` instead.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from models.config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """float64 [head_dim // 2]: the rotation frequency of each pair of dims."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv = 1.0 / rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope.scaling is None:
        return inv
    if rope.scaling == "linear":
        return inv / rope.factor
    if rope.scaling == "yarn":
        return _yarn(rope, inv, head_dim)
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
    old = rope.original_max_position
    low_wavelen = old / rope.low_freq_factor
    high_wavelen = old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn(rope: RopeConfig, inv: np.ndarray, head_dim: int) -> np.ndarray:
    """YaRN: interpolated (inv / factor) below a band of wavelengths, kept above it,
    a linear ramp between; the band is where `beta_fast`..`beta_slow` rotations fit in
    the original context."""

    def dim_of(rotations: float) -> float:  # the pair index making `rotations` turns
        ratio = rope.original_max_position / (rotations * 2 * math.pi)
        return head_dim * math.log(ratio) / (2 * math.log(rope.theta))

    low, high = dim_of(rope.beta_fast), dim_of(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep inv), 0: interpolate (inv / factor)
    return inv / rope.factor * (1 - keep) + inv * keep


def attention_factor(rope: RopeConfig) -> float:
    """The scale of cos and sin (YaRN's attention temperature; 1 otherwise)."""
    if rope.scaling != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    return 1.0 if rope.factor <= 1 else 0.1 * math.log(rope.factor) + 1.0


def apply_rope(x, positions, rope: RopeConfig):
    """Rotate x [batch, seq, heads, head_dim] by positions int [batch, seq].

    Computed in float32, returned in x.dtype. Padding positions (-1) give finite
    values that nothing reads.
    """
    inv = jnp.asarray(inv_frequencies(rope, x.shape[-1]), jnp.float32)  # [D/2]
    angle = positions.astype(jnp.float32)[..., None] * inv  # [B, S, D/2]
    scale = attention_factor(rope)
    cos = scale * jnp.cos(angle)[:, :, None, :]  # [B, S, 1, D/2]
    sin = scale * jnp.sin(angle)[:, :, None, :]
    xf = x.astype(jnp.float32)
    if rope.interleaved:  # pairs (x[2i], x[2i+1]) times cos + i sin
        pairs = xf.reshape(*xf.shape[:-1], -1, 2)  # [B, S, H, D/2, 2]
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return out.reshape(x.shape).astype(x.dtype)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
