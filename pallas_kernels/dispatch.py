"""One entry point for paged attention, choosing the backend by platform.

``cpu`` -> the pure-JAX reference, ``gpu`` -> the Triton kernel, ``tpu`` -> the Mosaic
kernel. Override with ``backend=`` or the environment variable
``JENGA_ATTENTION_BACKEND`` (``reference``, ``triton`` or ``mosaic``); the argument wins.
Forcing a backend is how a CPU machine exports the GPU/TPU paths (``jax.export`` with
``platforms=["cuda"]`` / ``["tpu"]``) or runs them in interpret mode. The choice is
logged once per (backend, reason) with :mod:`logging`. On TPU a head dim above 128 runs
the reference (the Mosaic kernel does not compile for it yet; forcing "mosaic" raises).
"""

from __future__ import annotations

import logging
import os

import jax

from pallas_kernels import mosaic_paged, reference, triton_paged

logger = logging.getLogger(__name__)

ENV_VAR = "JENGA_ATTENTION_BACKEND"
MOSAIC_MAX_HEAD_DIM = 128  # larger head dims fall back to the reference on TPU
BACKENDS = ("reference", "triton", "mosaic")
_BY_PLATFORM = {
    "cpu": "reference",
    "gpu": "triton",
    "cuda": "triton",
    "rocm": "triton",
    "tpu": "mosaic",
}
_IMPLS = {
    "reference": reference.paged_attention,
    "triton": triton_paged.paged_attention,
    "mosaic": mosaic_paged.paged_attention,
}
_logged: set[tuple[str, str]] = set()


def parse_backend(spec: str | None) -> tuple[str | None, bool]:
    """ "triton", "mosaic-interpret", None, ... -> (backend or None, interpret)."""
    name, _, mode = (spec or "").partition("-")
    if mode not in ("", "interpret"):
        raise ValueError(f"unknown attention backend {spec!r} (a backend, '-interpret' optional)")
    return name or None, mode == "interpret"


def choose_backend(backend: str | None = None) -> tuple[str, str]:
    """-> (backend, reason). Raises ValueError for an unknown name or platform."""
    if backend is not None:
        name, reason = backend, "argument"
    elif os.environ.get(ENV_VAR):
        name, reason = os.environ[ENV_VAR], f"${ENV_VAR}"
    else:
        platform = jax.default_backend()
        if platform not in _BY_PLATFORM:
            raise ValueError(f"no paged-attention backend for platform {platform!r}")
        name, reason = _BY_PLATFORM[platform], f"platform {platform}"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r} (from {reason})")
    return name, reason


def paged_attention(
    q,
    view,
    block_tables,
    kv_lens,
    q_positions,
    *,
    layer: int,
    kind: str,
    window: int | None = None,
    chunk: int | None = None,
    scale: float,
    soft_cap: float | None = None,
    sinks=None,
    page_fill=None,
    backend: str | None = None,
    interpret=False,
    **tuning,
):
    """Paged attention (signature and semantics of the pure-JAX reference) on any backend.

    ``page_fill`` (cross only): see :mod:`pallas_kernels.reference`. ``interpret`` runs
    a kernel on CPU (Triton: ``interpret=True``; Mosaic: TPU interpret mode, True or a
    ``pltpu.InterpretParams``); ``tuning`` goes to the kernel (block sizes, splits).
    Usable under ``jit`` with traced tables, lengths and positions; ``layer``, ``kind``,
    ``window``, ``chunk``, ``scale`` and ``soft_cap`` are static for the kernels.
    """
    name, reason = choose_backend(backend)
    if name == "mosaic" and not interpret and view.shape[-1] > MOSAIC_MAX_HEAD_DIM:
        # Mosaic's strided loads need a 128-lane last dim (docs/kernels.md): not yet.
        if reason == "argument":
            raise ValueError(
                f"the Mosaic kernel does not compile for head_dim {view.shape[-1]} > "
                f"{MOSAIC_MAX_HEAD_DIM} yet; use the reference backend"
            )
        name, reason = "reference", f"head_dim {view.shape[-1]} > {MOSAIC_MAX_HEAD_DIM} on TPU"
    if (name, reason) not in _logged:
        _logged.add((name, reason))
        logger.info("paged attention backend: %s (%s)", name, reason)
    opts = dict(layer=layer, kind=kind, window=window, chunk=chunk, scale=scale)
    opts.update(soft_cap=soft_cap, sinks=sinks, page_fill=page_fill)
    if name == "reference":
        if tuning or interpret:
            raise ValueError("the reference backend takes no interpret or tuning arguments")
        return reference.paged_attention(q, view, block_tables, kv_lens, q_positions, **opts)
    return _IMPLS[name](
        q, view, block_tables, kv_lens, q_positions, **opts, interpret=interpret, **tuning
    )
