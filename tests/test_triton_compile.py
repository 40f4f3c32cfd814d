"""The Triton kernels compile for sm_90 and sm_80 without register spills (no GPU needed).

The kernels' TTIR comes from ``jax.export`` for cuda; the ``triton`` package compiles it to
PTX and its ``ptxas -v`` reports registers and spills (``pallas_kernels/gpu_compile.py``).
Without ``triton`` installed only the export-side tests run.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import pytest

from pallas_kernels import gpu_compile, triton_paged

# what -> (batch, q_len, context); 8 query heads on 2 KV heads (GQA 4), one layer.
SHAPES = {"decode": (2, 1, 512), "prefill": (2, 128, 512)}


@functools.cache
def _kernel(what, dtype, head_dim, q_heads=8, kv_heads=2, tuning=()):
    batch, q_len, context = SHAPES[what]
    case = gpu_compile.PagedCase(
        batch, q_len, context, q_heads, kv_heads, head_dim, jnp.dtype(dtype), tuning=tuning
    )
    [kernel] = gpu_compile.export_triton_kernels(*case.export_args())
    return case, kernel


@functools.cache
def _compiled(what, dtype, head_dim, target, q_heads=8, kv_heads=2):
    _, kernel = _kernel(what, dtype, head_dim, q_heads, kv_heads)
    return gpu_compile.compile_kernel(kernel, target)


NO_SPILL = [
    (dtype, head_dim)
    for dtype, dims in [("bfloat16", (64, 128, 256)), ("float32", (64, 128))]
    for head_dim in dims
]


@pytest.mark.parametrize("target", list(gpu_compile.TARGETS))
@pytest.mark.parametrize("what", list(SHAPES))
@pytest.mark.parametrize("dtype,head_dim", NO_SPILL, ids=[f"{d}-{h}" for d, h in NO_SPILL])
def test_default_tiles_do_not_spill(dtype, head_dim, what, target):
    pytest.importorskip("triton")
    used = _compiled(what, dtype, head_dim, target)
    assert used.spill_bytes == 0, used
    assert 0 < used.shared_bytes <= gpu_compile.SHARED_LIMIT[target], used
    assert 0 < used.registers <= 255, used


def test_padded_head_dim_does_not_spill():
    """head_dim 80 (MHA, as in phi-2) is padded to 128; the padded columns cost nothing.

    (Clamping their indices instead of only masking them spilled 124-204 B in decode.)
    """
    pytest.importorskip("triton")
    used = _compiled("decode", "bfloat16", 80, "sm_80", q_heads=4, kv_heads=4)
    assert used.spill_bytes == 0, used


def test_export_carries_ttir_and_tiles():
    """The custom call holds TTIR and the default (or given) warps and stages."""
    case, kernel = _kernel("prefill", "float32", 128)
    tiles = case.tiles()
    assert tiles == triton_paged.default_tiles(128, 4, 128, jnp.float32)
    assert (kernel.num_warps, kernel.num_stages) == (tiles.num_warps, tiles.num_stages)
    assert kernel.name == "jenga_paged_attention_full"
    assert "tt.func public @jenga_paged_attention_full" in kernel.ttir
    assert f"tensor<{tiles.block_keys}x128xf32>" in kernel.ttir  # one key block of K
    tuned = (("block_keys", 16), ("num_warps", 2), ("num_stages", 3))
    case, kernel = _kernel("prefill", "float32", 128, tuning=tuned)
    assert (kernel.num_warps, kernel.num_stages) == (2, 3)
    assert case.tiles() == triton_paged.Tiles(32, 16, 2, 3)  # default rows, given keys
    assert "tensor<16x128xf32>" in kernel.ttir


def test_default_tiles_table():
    tiles = triton_paged.default_tiles
    assert tiles(1, 4, 128, jnp.bfloat16) == triton_paged.Tiles(16, 64, 4, 2)
    assert tiles(512, 4, 128, jnp.bfloat16) == triton_paged.Tiles(64, 64, 8, 2)
    assert tiles(512, 4, 64, jnp.bfloat16) == triton_paged.Tiles(64, 64, 4, 2)
    assert tiles(512, 4, 256, jnp.bfloat16) == triton_paged.Tiles(64, 16, 8, 2)
    assert tiles(1, 4, 128, jnp.float32) == triton_paged.Tiles(16, 32, 8, 2)
    assert tiles(512, 1, 256, jnp.float32) == triton_paged.Tiles(16, 16, 4, 2)
    assert tiles(1, 1, 256, jnp.float32) == triton_paged.Tiles(16, 16, 8, 2)
    assert tiles(1, 32, 80, jnp.bfloat16).block_rows == 32  # the whole group in one tile
    assert tiles(512, 4, 256, jnp.float32, block_rows=16, block_keys=64).block_keys == 64


def test_parse_ptxas_log():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_80'\n"
        "ptxas info    : Function properties for k\n"
        "    224 bytes stack frame, 224 bytes spill stores, 212 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 440 bytes cmem[0]\n"
    )
    got = gpu_compile.parse_ptxas_log(log)
    assert got == dict(registers=255, spill_bytes=224, stack_bytes=224)
    with pytest.raises(ValueError, match="no resource usage"):
        gpu_compile.parse_ptxas_log("ptxas fatal   : Unresolved extern function")
