"""Compile every step shape an engine can produce, before serving.

An engine's steps take a few shapes only: batch and query sizes from its buckets, a few
block-table levels (every kind's width chosen together, ``Buckets.kind_levels``), one
encoder width, images or not. A prefill chunk of q queries needs at least q / tpp pages
of every token kind, so levels narrower than its query bucket's shortest chunk are left
out. Running each shape once on an all-padding page table (every page id -1: nothing is
read or written) compiles them, so serving never compiles again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import jax
import numpy as np

from jenga_jax.core.layer_kinds import AttentionType
from jenga_jax.device.page_table import KindTable, PageTable, StateTable
from jenga_jax.device.pool import PoolLayout
from jenga_jax.engine.model_runner import PreparedStep
from jenga_jax.engine.page_table_builder import StepRow
from jenga_jax.engine.sampling import SamplerBatch, SamplingParams
from jenga_jax.engine.steps import SamplerInputs, StepInputs

LOG = logging.getLogger("jenga_jax")


def padding_table(layout: PoolLayout, batch: int, queries: int, kind_pages, encoder: int):
    """A page table of padding rows only: [batch, queries], block tables of kind k
    [batch, kind_pages[k]], encoder slots [batch, encoder]."""
    kinds = []
    for view, pages in zip(layout.kinds, kind_pages):
        if view.is_state:
            s = view.pages_per_state
            kinds.append(
                StateTable(np.full((batch, s), -1, np.int32), np.full((batch, s), -1, np.int32))
            )
            continue
        cross = view.type is AttentionType.CROSS
        slots = encoder if cross else queries
        inline = {}
        if view.inline_images:  # the paged plan: images ahead of the text in the stream
            inline = dict(
                key_offsets=np.zeros(batch, np.int32),
                image_slot_pages=np.full((batch, encoder), -1, np.int32),
                image_slot_offsets=np.zeros((batch, encoder), np.int32),
            )
        kinds.append(
            KindTable(
                np.full((batch, pages), -1, np.int32),
                np.zeros(batch, np.int32),
                np.full((batch, slots), -1, np.int32),
                np.zeros((batch, slots), np.int32),
                np.zeros((batch, pages), np.int32) if cross else None,
                **inline,
            )
        )
    return PageTable(np.full((batch, queries), -1, np.int32), tuple(kinds))


def step_shapes(engine) -> list[tuple[bool, int, int, int, tuple[int, ...]]]:
    """(decode, batch, queries, encoder, block-table widths) of every step the engine
    can run."""
    buckets, cfg = engine.runner.buckets, engine.config
    levels = buckets.kind_levels or (engine.kind_pages,)
    prefill_batches = [b for b in buckets.batch if b <= buckets.batch_size(cfg.max_prefill_rows)]
    shapes = [(True, b, 1, 0, w) for b in buckets.batch for w in levels]
    encoders = [0] + ([engine.max_encoder_tokens] if engine.max_encoder_tokens else [])
    tpp = [v.tokens_per_page if v.is_token_kind else 0 for v in engine.runner.plan.kinds]
    smaller = (0, *buckets.queries)
    for q, below in zip(buckets.queries, smaller):
        fits = [w for w in levels if all(-(-(below + 1) // t) <= n for t, n in zip(tpp, w) if t)]
        shapes += [(False, b, q, e, w) for b in prefill_batches for e in encoders for w in fits]
    return shapes


def warmup(engine, progress: Callable[[int, int], None] | None = None) -> int:
    """Run every step shape once, and the device sampler at its batch; returns how many
    step shapes ran. The pool is unchanged (padding rows write nothing). progress(done, total) is
    called after each shape; each is also logged (logger "jenga_jax", DEBUG)."""
    runner = engine.runner
    cfg = engine.cfg
    steps = runner.steps
    shapes = step_shapes(engine)
    sampled = runner.sampled  # a step in flight may feed on it: put back afterwards
    for done, (decode, batch, queries, encoder, widths) in enumerate(shapes, 1):
        table = padding_table(runner.layout, batch, queries, widths, encoder)
        embeds = np.zeros((batch, encoder, cfg.vision_dim), cfg.dtype) if encoder else None
        inputs = StepInputs(
            np.zeros((batch, queries), np.int32), embeds, np.full(batch, -1, np.int32)
        )
        params = [SamplingParams(temperature=1.0)] * batch
        sampler = SamplerBatch.build(
            params, [0] * batch, [""] * batch, vocab_size=cfg.vocab_size, engine_seed=0
        )
        fn = steps.decode if decode else steps.prefill
        table, inputs, sampling = jax.device_put((table, inputs, SamplerInputs.from_batch(sampler)))
        step = PreparedStep(fn, table, inputs, (StepRow("", 0, 1),), False, sampling)
        t0 = time.perf_counter()
        runner.fetch_tokens([runner.dispatch(step)[0]], [1])  # at slot 0 (the offset is traced)
        LOG.debug(
            "step shape %d/%d (%s, batch %d, queries %d, encoder %d, pages %s): %.2f s",
            done, len(shapes), "decode" if decode else "prefill", batch, queries, encoder,
            widths, time.perf_counter() - t0,
        )  # fmt: skip
        if progress is not None:
            progress(done, len(shapes))
    runner.sampled = sampled
    return len(shapes)
