"""Input validation shared by every attention backend.

``check_paged_inputs`` is the pure-JAX reference's own validation, so that a caller sees
the same ``ValueError`` whichever backend runs; the kernels add their static arguments.
"""

from __future__ import annotations

import jax
import numpy as np

from jenga_jax.device.reference_attention import check_paged_inputs

__all__ = ["check_paged_inputs", "positive_int", "static_float"]


def static_float(name: str, x) -> float | None:
    """``scale`` and ``soft_cap`` are baked into a kernel: they must be Python numbers."""
    if x is None:
        return None
    if isinstance(x, jax.core.Tracer) or (isinstance(x, jax.Array) and x.ndim != 0):
        raise ValueError(f"{name} must be a static Python float for the Pallas kernels, got {x!r}")
    return float(x)


def positive_int(name: str, x, *, power_of_2: bool = False, minimum: int = 1) -> int:
    if not isinstance(x, (int, np.integer)) or isinstance(x, bool) or x < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {x!r}")
    if power_of_2 and x & (x - 1):
        raise ValueError(f"{name} must be a power of 2, got {x}")
    return int(x)
