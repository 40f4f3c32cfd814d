"""The jitted steps: in-place pool updates, one compile per shape bucket."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from jenga_jax.core import make_plan
from jenga_jax.engine.compile_counter import CompileCounter
from jenga_jax.engine.model_runner import Image, ModelRunner, Work
from jenga_jax.engine.steps import DECODE_NAME, PREFILL_NAME
from models import FAMILIES, tiny_config
from paged_scenario import random_model

MIB = 2**20


def _runner(family: str, pool_bytes: int, **kw) -> ModelRunner:
    cfg = tiny_config(family)
    plan = make_plan(cfg.layout(cfg.dtype))
    return ModelRunner(
        random_model(family), num_large_pages=math.ceil(pool_bytes / plan.large_page_bytes), **kw
    )


def _images(runner, n=20):
    dim = runner.cfg.vision_dim
    if dim is None:
        return []
    return [Image("img", np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32))]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_steps_update_the_pool_in_place(family):
    """memory_analysis of the compiled steps: the pool is aliased, temporaries < 10%."""
    runner = _runner(family, 64 * MIB)
    pool_bytes = runner.layout.nbytes
    assert pool_bytes >= 64 * MIB
    runner.add_request("a", list(range(1, 41)), images=_images(runner), max_new_tokens=4)
    for decode, work in ((False, Work("a", 40)), (True, Work("a", 1, (7,)))):
        rows, refused = runner.allocate([work])
        assert rows and not refused
        step = runner.prepare(rows, decode=decode)
        compiled = step.fn.lower(runner.params, runner.pool, step.table, step.inputs).compile()
        mem = compiled.memory_analysis()
        assert mem.alias_size_in_bytes >= pool_bytes, (family, decode, mem)
        assert mem.temp_size_in_bytes < 0.1 * pool_bytes, (family, decode, mem)
        before = runner.pool.unsafe_buffer_pointer()
        runner.execute(step)
        assert runner.pool.unsafe_buffer_pointer() == before  # the same buffer, updated


@pytest.mark.parametrize("family", ["gemma3", "jamba"])
def test_one_compile_per_shape_bucket(family):
    """300 steps with a varying batch compile at most once per distinct bucket."""
    runner = _runner(family, 8 * MIB)
    rng = np.random.default_rng(0)
    waiting, running, last, life = [], {}, {}, {}
    signatures = {DECODE_NAME: set(), PREFILL_NAME: set()}
    n_req = 0
    with CompileCounter() as counter:
        for _ in range(300):
            if len(waiting) + len(running) < 8 and rng.random() < 0.3:
                rid = f"r{n_req}"
                n_req += 1
                prompt = rng.integers(1, 256, rng.integers(3, 30)).tolist()
                runner.add_request(rid, prompt, max_new_tokens=40)
                waiting.append(rid)
                life[rid] = int(rng.integers(4, 40))
            work = [Work(rid, 1, (last[rid],)) for rid in running]
            decode = not waiting
            if waiting:
                work += [Work(rid, runner.manager.num_tokens(rid)) for rid in waiting]
            if not work:
                continue
            rows, refused = runner.allocate(work)
            assert not refused
            step = runner.prepare(rows, decode=decode)
            shapes = jax.tree.map(lambda x: x.shape, (step.table, step.inputs))
            signatures[DECODE_NAME if decode else PREFILL_NAME].add(str(shapes))
            logits = runner.execute(step)
            for row, lg in zip(rows, logits):
                running[row.request_id] = running.get(row.request_id, 0) + 1
                last[row.request_id] = int(np.argmax(lg))
            waiting = []
            for rid, n in list(running.items()):
                if n >= life[rid]:
                    runner.free(rid)
                    del running[rid], last[rid]
    for name, seen in signatures.items():
        assert seen, name
        assert 1 <= counter.counts[name] <= len(seen), (name, counter.counts, len(seen))
    assert len(signatures[DECODE_NAME]) <= 16  # batch buckets x page buckets stay few
