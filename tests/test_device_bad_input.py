"""Bad input to the device side: a clear error before anything is written to the pool."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from jax.experimental import checkify

from jenga_jax.core import RequestError
from jenga_jax.engine.model_runner import Image, ModelRunner, Work
from paged_scenario import random_model


def _runner(family="gemma2", **kw) -> ModelRunner:
    return ModelRunner(random_model(family), num_large_pages=64, pool_fill=0.5, **kw)


def _started(runner, rid="a", n=20):
    runner.add_request(rid, list(range(1, n + 1)), max_new_tokens=8)
    runner.step([Work(rid, n)])
    return runner


def _unchanged(runner, before):
    assert not runner.pool.is_deleted()
    np.testing.assert_array_equal(np.asarray(runner.pool), before)


def test_out_of_range_page_id_is_caught_on_the_host(monkeypatch):
    runner = _started(_runner())
    before = np.asarray(runner.pool)
    rows, _ = runner.allocate([Work("a", 1, (3,))])
    real = runner.manager.block_table
    bad = runner.layout.kinds[0].num_pages

    def corrupt(rid, k):
        return [*real(rid, k)[:-1], bad] if k == 0 else real(rid, k)

    monkeypatch.setattr(runner.manager, "block_table", corrupt)
    with pytest.raises(ValueError, match=rf"page ids \[{bad}\] out of \[0, {bad}\)"):
        runner.prepare(rows, decode=True)
    _unchanged(runner, before)


def test_out_of_range_page_id_is_caught_on_the_device_in_debug_mode():
    runner = _started(_runner(debug=True))
    before = np.asarray(runner.pool)
    rows, _ = runner.allocate([Work("a", 1, (3,))])
    step = runner.prepare(rows, decode=True)
    kind0 = step.table.kinds[0]
    bad_ids = kind0.block_tables.at[0, 0].set(runner.layout.kinds[0].num_pages + 5)
    table = step.table.replace(kinds=(kind0.replace(block_tables=bad_ids), *step.table.kinds[1:]))
    with pytest.raises(checkify.JaxRuntimeError, match="page id out of"):
        runner.execute(dataclasses.replace(step, table=table))
    _unchanged(runner, before)
    runner.execute(step)  # the good table still runs on the intact pool
    assert not np.array_equal(np.asarray(runner.pool), before)


def test_page_table_for_another_model_is_rejected():
    gemma = _started(_runner("gemma2"))
    rows, _ = gemma.allocate([Work("a", 1, (3,))])
    foreign = gemma.prepare(rows, decode=True)
    for family, match in (("llama", "page table has 2 kinds"), ("jamba", "needs a StateTable")):
        runner = _started(_runner(family))
        before = np.asarray(runner.pool)
        with pytest.raises(ValueError, match=match):
            runner.steps.decode(runner.params, runner.pool, foreign.table, foreign.inputs)
        _unchanged(runner, before)


def test_prompt_beyond_max_length():
    runner = _runner()
    limit = runner.cfg.max_seq_len
    with pytest.raises(RequestError, match="maximum length"):
        runner.add_request("long", [1] * (limit + 1))
    with pytest.raises(RequestError, match="maximum length"):
        runner.add_request("long", [1] * (limit - 4), max_new_tokens=5)
    assert "long" not in runner.manager
    runner.add_request("ok", [1] * 10, max_new_tokens=5)
    with pytest.raises(RequestError, match="maximum length"):
        runner.step([Work("ok", 10, tuple([1] * (limit - 9)))])
    assert not runner.manager.is_running("ok")


def test_bad_token_ids():
    runner = _started(_runner())
    vocab = runner.cfg.vocab_size
    with pytest.raises(RequestError, match="token ids must be in"):
        runner.add_request("b", [1, vocab])
    computed = runner.manager.num_computed_tokens("a")
    runner.add_request("c", [1, 2, 3])
    with pytest.raises(RequestError, match="out of"):  # the whole step is checked first
        runner.step([Work("c", 3), Work("a", 1, (vocab,))])
    assert runner.manager.num_computed_tokens("a") == computed
    assert not runner.manager.is_running("c")


def test_image_embeddings_of_the_wrong_shape():
    runner = _runner("llama-vision")
    dim = runner.cfg.vision_dim
    before = np.asarray(runner.pool)
    for embeds in (np.zeros((20, dim + 1)), np.zeros((dim,)), np.zeros((0, dim))):
        with pytest.raises(RequestError, match=f"embeddings must be \\[num_tokens >= 1, {dim}\\]"):
            runner.add_request("v", [1, 2, 3], images=[Image("img", embeds)])
    assert "v" not in runner.manager
    runner.add_request("v", [1, 2, 3], images=[Image("img", np.ones((20, dim), np.float32))])
    rows, _ = runner.allocate([Work("v", 3)])
    step = runner.prepare(rows, decode=False)
    wrong = step.inputs.replace(image_embeds=step.inputs.image_embeds[..., :-1])
    with pytest.raises(ValueError, match="image_embeds must be"):
        runner.execute(dataclasses.replace(step, inputs=wrong))
    _unchanged(runner, before)
    with pytest.raises(RequestError, match="takes no images"):
        _runner("llama").add_request("x", [1], images=[Image("img", np.ones((4, dim)))])


def test_decode_rows_have_one_token():
    runner = _started(_runner())
    rows, _ = runner.allocate([Work("a", 2, (3, 4))])
    with pytest.raises(ValueError, match="exactly one query token"):
        runner.prepare(rows, decode=True)
