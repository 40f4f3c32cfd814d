"""The GPU and TPU paths lower on a CPU-only machine (jax.export to "cuda" and "tpu").

Exporting runs the Pallas -> Triton and Pallas -> Mosaic lowerings in Python, so an op
a backend cannot lower fails here, in CI. What only the device compilers check (Triton's
PTX generation, Mosaic's (8, 128) vector layouts in libtpu) is not covered.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels import dispatch

# jax 0.10.2 names the Triton custom call "__gpu$xla.gpu.triton" (older: triton_kernel_call).
TRITON_CALLS = ("__gpu$xla.gpu.triton", "triton_kernel_call")
OPTS = {"full": {}, "sliding": {"window": 64}, "chunked": {"chunk": 128}, "cross": {}}


def _export(backend, platform, *, kind, q_len, dtype, head_dim=128, page_fill=False, sinks=True):
    batch, q_heads, kv_heads, tpp, pages, max_pages = 3, 8, 2, 16, 64, 12
    shapes = [
        jax.ShapeDtypeStruct((batch, q_len, q_heads, head_dim), dtype),
        jax.ShapeDtypeStruct((pages, 3, tpp, 2 * kv_heads, head_dim), dtype),
        jax.ShapeDtypeStruct((batch, max_pages), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((batch, q_len), jnp.int32),
    ]
    if page_fill:
        shapes.append(jax.ShapeDtypeStruct((batch, max_pages), jnp.int32))
    f = functools.partial(
        dispatch.paged_attention,
        layer=2,
        kind=kind,
        scale=head_dim**-0.5,
        soft_cap=30.0,
        backend=backend,
        **OPTS[kind],
    )

    def step(q, view, block_tables, kv_lens, q_positions, *fill):
        s = jnp.linspace(-1.0, 1.0, q_heads) if sinks else None
        return f(
            q,
            view,
            block_tables,
            kv_lens,
            q_positions,
            sinks=s,
            page_fill=fill[0] if fill else None,
        )

    checks = []
    if platform == "cuda":
        checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALLS[0])]
    exported = export.export(jax.jit(step), platforms=[platform], disabled_checks=checks)(*shapes)
    assert exported.out_avals[0].shape == (batch, q_len, q_heads, head_dim)
    return exported.mlir_module()


def _custom_calls(text):
    return set(re.findall(r"custom_call @([\w$.]+)", text))


CASES = [
    (kind, q_len, dtype)
    for kind in OPTS
    for q_len, dtype in [(1, jnp.bfloat16), (32, jnp.bfloat16), (1, jnp.float32)]
]
IDS = [f"{k}-{'decode' if n == 1 else 'prefill'}-{jnp.dtype(d).name}" for k, n, d in CASES]


@pytest.mark.parametrize("kind,q_len,dtype", CASES, ids=IDS)
def test_triton_exports_for_cuda(kind, q_len, dtype):
    text = _export("triton", "cuda", kind=kind, q_len=q_len, dtype=dtype)
    calls = _custom_calls(text)
    assert calls & set(TRITON_CALLS), calls
    # The wrapper never gathers pages into a contiguous copy: the kernel reads the view.
    assert "stablehlo.gather" not in text and "dynamic_slice" not in text


@pytest.mark.parametrize("kind,q_len,dtype", CASES, ids=IDS)
def test_mosaic_exports_for_tpu(kind, q_len, dtype):
    text = _export("mosaic", "tpu", kind=kind, q_len=q_len, dtype=dtype)
    assert "tpu_custom_call" in _custom_calls(text)
    assert "stablehlo.gather" not in text and "dynamic_slice" not in text


@pytest.mark.parametrize("head_dim", [64, 80, 256])
@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("mosaic", "tpu")])
def test_head_dims_and_page_fill_export(backend, platform, head_dim):
    export = functools.partial(
        _export,
        backend,
        platform,
        kind="cross",
        q_len=1,
        dtype=jnp.bfloat16,
        head_dim=head_dim,
        page_fill=True,
        sinks=False,
    )
    if backend == "mosaic" and head_dim > dispatch.MOSAIC_MAX_HEAD_DIM:
        with pytest.raises(ValueError, match=f"does not compile for head_dim {head_dim}"):
            export()  # forced Mosaic at a head dim it cannot compile: a clear error
        return
    assert _custom_calls(export()) & {*TRITON_CALLS, "tpu_custom_call"}


def test_reference_backend_exports_without_custom_calls():
    text = _export("reference", "cuda", kind="sliding", q_len=1, dtype=jnp.bfloat16)
    assert not _custom_calls(text) & {*TRITON_CALLS, "tpu_custom_call"}
