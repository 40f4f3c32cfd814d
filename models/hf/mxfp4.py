"""MXFP4 (OCP microscaling FP4), as gpt-oss's published experts are stored.

Each group of 32 weights along the input axis is 16 bytes of E2M1 values (two per
byte, low nibble first) and one shared power-of-two scale byte (exponent + 127).
`*_blocks` [experts, out, groups, 16] and `*_scales` [experts, out, groups] hold
a weight whose unquantized form is [experts, in = groups * 32, out].
"""

from __future__ import annotations

import numpy as np

E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    np.float32,
)
GROUP = 32  # weights per scale


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """uint8 blocks [..., out, groups, 16] (or [..., out, groups * 16]) and scales
    [..., out, groups] -> float32 [..., groups * 32, out] (exact: FP4 times 2^k)."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype}, {scales.dtype}")
    blocks = blocks.reshape(*scales.shape, GROUP // 2)  # [..., out, G, 16]
    values = np.empty((*scales.shape, GROUP), np.float32)  # [..., out, G, 32]
    values[..., 0::2] = E2M1_VALUES[blocks & 0x0F]
    values[..., 1::2] = E2M1_VALUES[blocks >> 4]
    exponents = scales.astype(np.int32)[..., None] - 127  # [..., out, G, 1]
    weights = np.ldexp(values, exponents).reshape(*scales.shape[:-1], -1)  # [..., out, in]
    return np.swapaxes(weights, -1, -2)  # [..., in, out]


def quantize(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [..., in, out] -> (blocks, scales) with the smallest scale that fits each
    group, values rounded to the nearest E2M1 (tests build MXFP4 checkpoints with it)."""
    w = np.swapaxes(np.asarray(weights, np.float32), -1, -2)  # [..., out, in]
    if w.shape[-1] % GROUP:
        raise ValueError(f"MXFP4 needs the input axis to be a multiple of {GROUP}")
    groups = w.reshape(*w.shape[:-1], -1, GROUP)  # [..., out, G, 32]
    peak = np.abs(groups).max(axis=-1, keepdims=True)
    exponent = np.ceil(np.log2(np.maximum(peak, 1e-30) / 6.0)).clip(-127, 127)
    scaled = groups / np.exp2(exponent)  # within [-6, 6]
    codes = np.abs(scaled[..., None] - E2M1_VALUES).argmin(axis=-1).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., out, G, 16]
    scales = (exponent[..., 0] + 127).astype(np.uint8)  # [..., out, G]
    return blocks, scales
