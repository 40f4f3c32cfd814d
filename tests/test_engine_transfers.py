"""What crosses from the device to the host per engine step: the sampled token ids only.

The engine's one fetch per step (``ModelRunner.fetch_tokens``) is watched, and so is what
each dispatched step hands back (the logits stay on the device, sampled there): int32
token ids, one per padded row. The steps also run under
``jax.transfer_guard_device_to_host("disallow")``, which makes any implicit copy raise
on an accelerator (on CPU, where device memory is host memory, JAX's guard lets every
copy through).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jenga_jax.engine.llm_engine import Engine
from jenga_jax.engine.sampling import SamplingParams
from jenga_jax.engine.scheduler import SchedulerConfig
from models import HybridDecoder, tiny_config


def test_a_step_fetches_only_token_ids():
    cfg = tiny_config("gemma3")
    engine = Engine(
        HybridDecoder(cfg, rngs=nnx.Rngs(0)),
        num_large_pages=64,
        max_model_len=96,
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32),
        compilation_cache_dir="off",
    )
    runner = engine.runner
    fetched, outputs = [], []
    fetch, dispatch = runner.fetch_tokens, runner.dispatch

    def watched_fetch(pending, counts):
        fetched.extend((p.dtype, p.shape) for p in pending)
        return fetch(pending, counts)

    def watched_dispatch(step, slot_offset=0):  # what a step leaves for the host to fetch
        tokens = dispatch(step, slot_offset)
        outputs.append((tokens.dtype, tokens.shape))
        return tokens

    runner.fetch_tokens, runner.dispatch = watched_fetch, watched_dispatch
    rng = np.random.default_rng(0)
    params = [
        SamplingParams(temperature=0.0, max_tokens=6),
        SamplingParams(temperature=0.8, top_k=5, seed=1, max_tokens=9),
        SamplingParams(temperature=1.0, top_p=0.7, max_tokens=4),
    ]
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (40, 7, 70)]
    with jax.transfer_guard_device_to_host("disallow"):
        outs = engine.generate(prompts, params)
    assert [len(o.output_token_ids) for o in outs] == [6, 9, 4]
    assert fetched and outputs, "the engine ran no step"
    buckets = set(runner.buckets.batch)
    for dtype, shape in fetched + outputs:
        assert dtype == np.int32 and len(shape) == 1 and shape[0] in buckets, (dtype, shape)
