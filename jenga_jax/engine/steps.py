"""Jitted prefill and decode steps over the shared pool.

``(params, pool, page_table, inputs) -> (logits, pool)``. The engine leaves the logits
on the device and samples them there (``sample_into``, compiled once per batch bucket
rather than into every step shape), so what crosses to the host is one int32 token id
per row, never the logits [rows, vocab]. The sampled tokens also stay on the device in
a small buffer that the next step's rows can take their last token from
(``StepInputs.feed``), so the host can build that step before it has seen them.

The pool is donated: XLA updates it in place and the caller must use the returned one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.experimental import checkify

from jenga_jax.device.layer_cache import PagedCache
from jenga_jax.device.page_table import PageTable, check_matches, device_checks
from jenga_jax.device.pool import PoolLayout
from jenga_jax.engine.sampling import row_keys, sample_rows

PREFILL_NAME = "jenga_prefill_step"
DECODE_NAME = "jenga_decode_step"


@struct.dataclass
class StepInputs:
    """token_ids int32 [B, Q] (padding: any id); image_embeds [B, E, vision_dim] for
    rows that write their images' K/V this step (see the cross kinds' slots), else None.

    Tokens sampled on the device (asynchronous scheduling): feed int32 [B] is, per row,
    the slot of ``sampled`` int32 [S] (the engine's buffer of the last sampled tokens)
    holding its last query token, or -1 to keep token_ids. None: no feeding."""

    token_ids: jax.Array
    image_embeds: jax.Array | None = None
    feed: jax.Array | None = None
    sampled: jax.Array | None = None


@struct.dataclass
class SamplerInputs:
    """Per-row sampling parameters [B] (see ``SamplerBatch``): temperature float32 (0 =
    greedy), top_k int32 (0 = off), top_p float32 (1 = off), and the uint32 seeds,
    streams and positions that make each row's key (``sampling.row_keys``)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seeds: jax.Array
    streams: jax.Array
    positions: jax.Array

    @classmethod
    def from_batch(cls, batch) -> SamplerInputs:
        """From a host ``SamplerBatch`` (numpy, padded to the step's batch)."""
        return cls(
            batch.temperature, batch.top_k, batch.top_p, batch.seeds, batch.streams,
            batch.positions,
        )  # fmt: skip


def _check_inputs(model, table: PageTable, inputs: StepInputs, layout: PoolLayout) -> None:
    """Static checks at trace time: shapes that do not match raise before any write."""
    check_matches(table, layout)
    if inputs.token_ids.shape != table.q_positions.shape:
        raise ValueError(
            f"token_ids {inputs.token_ids.shape} must match the page table's q_positions "
            f"{table.q_positions.shape}"
        )
    cfg = model.cfg
    kinds = layout.image_kinds
    emb = inputs.image_embeds
    if emb is None:
        return
    if not kinds:
        raise ValueError(f"{cfg.name} has no cross-attention layers: image_embeds must be None")
    want = (table.batch, table.kinds[kinds[0]].encoder_slots, cfg.vision_dim)
    if emb.ndim != 3 or emb.shape != want:
        raise ValueError(
            f"image_embeds must be [batch, encoder_tokens, vision_dim] = {list(want)} "
            f"(vision_dim {cfg.vision_dim}), got {list(emb.shape)}"
        )


def _step(graphdef, params, pool, table, inputs, *, layout, all_logits, backend):
    model = nnx.merge(graphdef, params)
    _check_inputs(model, table, inputs, layout)
    cache = PagedCache(pool, table, inputs.image_embeds, layout, backend)
    rows = jnp.arange(table.batch)
    last = jnp.maximum(table.num_real_queries - 1, 0)  # [B] each row's last real token
    token_ids = inputs.token_ids  # [B, Q]
    if inputs.feed is not None:  # last tokens sampled by the previous step, on the device
        fed = inputs.sampled[jnp.clip(inputs.feed, 0, inputs.sampled.shape[0] - 1)]  # [B]
        token_ids = token_ids.at[rows, last].set(
            jnp.where(inputs.feed >= 0, fed, token_ids[rows, last])
        )
    cache, hidden = model(token_ids, table.q_positions, cache)  # [B, Q, d_model]
    if not all_logits:
        hidden = hidden[rows, last]  # [B, d_model]
    return model.logits(hidden), cache.pool


@jax.jit
def sample_on_device(logits, sampler: SamplerInputs):
    """(tokens int32 [B], logprobs float32 [B]) from a step's logits [B, V], on the
    device: the keys, then ``sampling.sample_rows``."""
    if sampler.temperature.shape != logits.shape[:1]:
        raise ValueError(
            f"sampler inputs must be [{logits.shape[0]}] (the step's batch), "
            f"got {sampler.temperature.shape}"
        )
    keys = row_keys(sampler.seeds, sampler.streams, sampler.positions)  # [B]
    return sample_rows(logits, sampler.temperature, sampler.top_k, sampler.top_p, keys)


@jax.jit
def sample_into(logits, sampler: SamplerInputs, sampled, offset):
    """``sample_on_device``, and the tokens also written into the buffer ``sampled``
    int32 [S] at slots [offset, offset + B) (the next step may feed on them). Returns
    (tokens int32 [B], logprobs float32 [B], the new buffer). Compiled once per batch
    bucket."""
    if offset.shape != () or sampled.shape[0] < logits.shape[0]:
        raise ValueError(
            f"a buffer of {sampled.shape} and a scalar offset, got {offset.shape}, "
            f"for {logits.shape[0]} rows"
        )
    tokens, logprobs = sample_on_device(logits, sampler)
    return tokens, logprobs, jax.lax.dynamic_update_slice(sampled, tokens, (offset,))


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted steps of one model over one pool layout.

    prefill(params, pool, table, inputs) -> (logits [B, V] of each row's last token, pool)
    prefill_all(...) -> (logits [B, Q, V] of every query token, pool)
    decode(...) -> (logits [B, V], pool), Q = 1
    With debug=True every page id of the table is first checked on the device
    (checkify, a separate small jitted check): a bad id raises
    ``checkify.JaxRuntimeError`` before the step runs, and the pool is left as it was.
    """

    prefill: Callable
    prefill_all: Callable
    decode: Callable
    params: nnx.State
    layout: PoolLayout


def make_steps(
    model: nnx.Module,
    layout: PoolLayout,
    *,
    debug: bool = False,
    attention_backend: str | None = None,
) -> Steps:
    """attention_backend: "reference", "triton" or "mosaic" (None: by platform)."""
    graphdef, params = nnx.split(model)
    checked_table = jax.jit(
        checkify.checkify(lambda table: device_checks(table, layout), errors=checkify.user_checks)
    )

    def build(name: str, all_logits: bool = False):
        def step(params, pool, table, inputs):
            return _step(
                graphdef, params, pool, table, inputs,
                layout=layout, all_logits=all_logits, backend=attention_backend,
            )  # fmt: skip

        step.__name__ = name
        jitted = jax.jit(step, donate_argnums=(1,))
        if not debug:
            return jitted

        def run(params, pool, table, inputs):
            err, _ = checked_table(table)
            err.throw()
            return jitted(params, pool, table, inputs)

        run.jitted = jitted
        return run

    return Steps(
        prefill=build(PREFILL_NAME),
        prefill_all=build(PREFILL_NAME + "_all", all_logits=True),
        decode=build(DECODE_NAME),
        params=params,
        layout=layout,
    )
