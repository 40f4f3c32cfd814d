"""Whole prefill and decode steps, ahead of time, for a device this machine may lack.

:func:`step_case` builds a family's steps at a given width over a pool of a given size
(abstract parameters: nothing is initialized), and the abstract arguments of one
prefill or decode step placed on a device, e.g. a compile-only TPU device from
:func:`pallas_kernels.tpu_compile.device`. Compiling them and reading
``memory_analysis()`` tells whether the donated pool is updated in place (aliased, with
temporaries far smaller than the pool) on that device, without running anything.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx

from jenga_jax.core import make_plan
from jenga_jax.device.pool import PoolLayout
from jenga_jax.engine.steps import StepInputs, make_steps
from jenga_jax.engine.warmup import padding_table
from models import HybridDecoder, tiny_config
from models.config import DTYPE_BYTES

# A real attention width (the issue's): d_model 1024, 32 query / 8 KV heads of 128.
WIDTH = dict(d_model=1024, num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=4096)


@dataclasses.dataclass(frozen=True)
class StepCase:
    """One step to compile: the jitted step and its abstract arguments."""

    family: str
    what: str  # "prefill" or "decode"
    batch: int
    queries: int  # per row
    context: int  # keys each row's block tables can hold
    layout: PoolLayout
    fn: object  # jitted step (params, pool, table, inputs) -> (logits, pool)
    args: tuple

    @property
    def pool_bytes(self) -> int:
        return self.layout.nbytes


def wide_config(family: str, dtype: str = "bfloat16", **width):
    """A tiny family's layer pattern and options at a real width (WIDTH, then ``width``)."""
    return dataclasses.replace(tiny_config(family), dtype=dtype, **{**WIDTH, **width})


def step_case(
    family: str,
    what: str,
    device,
    *,
    pool_bytes: int = 256 * 2**20,
    batch: int | None = None,
    queries: int = 32,
    context: int = 4096,
    attention_backend: str = "mosaic",
    dtype: str = "bfloat16",
    **width,
) -> StepCase:
    """The prefill (``queries`` per row, images where the family has them) or decode
    step of ``family`` at a real width over a pool of at least ``pool_bytes``, its
    arguments abstract and placed on ``device``. Pages: tokens per page a multiple of
    the TPU tile (16 for 2-byte dtypes, else 8), as the engine plans them for Mosaic."""
    if what not in ("prefill", "decode"):
        raise ValueError(f"what must be 'prefill' or 'decode', got {what!r}")
    from pallas_kernels.tpu_compile import place  # the one TPU-specific helper

    cfg = wide_config(family, dtype, **width)
    multiple = 16 if DTYPE_BYTES[dtype] == 2 else 8
    plan = make_plan(cfg.layout(cfg.dtype), tokens_per_page_multiple=multiple)
    state_dims = (cfg.d_inner, cfg.mamba.d_state, cfg.mamba.d_conv) if cfg.mamba else None
    layout = PoolLayout.from_plan(
        plan, math.ceil(pool_bytes / plan.large_page_bytes), state_dims=state_dims
    )
    model = nnx.eval_shape(lambda: HybridDecoder(cfg, rngs=nnx.Rngs(0)))
    steps = make_steps(model, layout, attention_backend=attention_backend)
    decode = what == "decode"
    batch = batch or (8 if decode else 2)
    n = 1 if decode else queries
    encoder = 0 if decode or not cfg.vision_dim else 16
    pages = [
        0 if k.is_state else -(-context // k.tokens_per_page) for k in layout.kinds
    ]  # fmt: skip
    table = padding_table(layout, batch, n, pages, encoder)
    embeds = np.zeros((batch, encoder, cfg.vision_dim), cfg.dtype) if encoder else None
    inputs = StepInputs(np.zeros((batch, n), np.int32), embeds)
    pool = jax.ShapeDtypeStruct(layout.shape, layout.storage_dtype("tpu"))
    args = place((steps.params, pool, table, inputs), device)
    fn = steps.decode if decode else steps.prefill
    return StepCase(family, what, batch, n, context, layout, fn, args)
