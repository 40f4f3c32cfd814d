"""Narrow-float pools written in place on XLA:CPU: stored and scattered as their bits.

XLA:CPU has no bfloat16 (float16, float8) scatter: float normalization upcasts its
operand, the whole pool, to float32 and converts it back after every write (temporaries
twice the pool, a step's time proportional to the pool, not to what it writes). A
scatter of unsigned ints of the same width is native and in place. So, on CPU:

- a pool of such a float is stored as unsigned ints holding the same bits
  (:func:`storage_dtype`; ``PoolLayout.full``), and viewed as floats to be read (the
  bitcast fuses into each gather, elements read only);
- :func:`scatter_set` writes on the bits: the float view's bitcast back to ints cancels
  with the one that made it (XLA folds ``bitcast-convert(bitcast-convert(x))`` to ``x``),
  so the stored ints are scattered in place.

Other platforms store and scatter the floats as before: ``lax.platform_dependent``
picks the branch when the step is lowered, for the platform it is lowered for. Values
written are bit-identical either way (NaN payloads included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_UINT = {1: np.uint8, 2: np.uint16}


def is_narrow_float(dtype) -> bool:
    """A float type narrower than float32 (XLA:CPU computes it in float32)."""
    dtype = np.dtype(dtype)
    return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize in _UINT


def bits_dtype(dtype) -> np.dtype:
    """The unsigned int of the same width as a narrow float."""
    return np.dtype(_UINT[np.dtype(dtype).itemsize])


def storage_dtype(dtype, platform: str | None = None) -> np.dtype:
    """How a pool of `dtype` is stored on `platform` (None: JAX's default backend):
    its bits as unsigned ints for a narrow float on CPU, else `dtype` itself."""
    platform = platform or jax.default_backend()
    if platform == "cpu" and is_narrow_float(dtype):
        return bits_dtype(dtype)
    return np.dtype(dtype)


def as_float(x, dtype):
    """x (floats of `dtype`, or their bits) -> floats of `dtype` (a bitcast)."""
    if x.dtype == np.dtype(dtype):
        return x
    if x.dtype != bits_dtype(dtype):
        raise ValueError(
            f"expected {np.dtype(dtype)} or its bits {bits_dtype(dtype)}, got {x.dtype}"
        )
    return jax.lax.bitcast_convert_type(x, dtype)


def as_stored(x, dtype):
    """Floats x -> `dtype`: the same floats, or their bits if `dtype` is those bits."""
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    if dtype != bits_dtype(x.dtype):
        raise ValueError(f"cannot store {x.dtype} as {dtype}")
    return jax.lax.bitcast_convert_type(x, dtype)


def full_bits(shape, value: float, dtype) -> jax.Array:
    """An array of `shape` filled with `value` as floats of `dtype`, stored as its bits
    (made directly in ints: no float copy of the whole array)."""
    bits = np.asarray(value, dtype=dtype).view(bits_dtype(dtype))
    return jnp.full(shape, bits, bits_dtype(dtype))


def scatter_set(x, index: tuple, values):
    """``x.at[index].set(values, mode="drop")``, written on the bits on CPU when x is a
    narrow float (in place instead of a float32 round trip of the whole x).

    x [...] any dtype; index: a tuple of int arrays, ints and slices (JAX indexing);
    values: broadcastable to ``x[index]``, cast to x.dtype."""
    values = jnp.asarray(values).astype(x.dtype)

    def floats(x, values):
        return x.at[index].set(values, mode="drop")

    if not is_narrow_float(x.dtype):
        return floats(x, values)

    def on_bits(x, values):
        ints = jax.lax.bitcast_convert_type(x, bits_dtype(x.dtype))
        new = jax.lax.bitcast_convert_type(values, ints.dtype)
        return jax.lax.bitcast_convert_type(ints.at[index].set(new, mode="drop"), x.dtype)

    return jax.lax.platform_dependent(x, values, cpu=on_bits, default=floats)
