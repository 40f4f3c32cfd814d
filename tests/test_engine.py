"""The engine end to end: tokens under preemption and prefix reuse equal a pool that
never preempts (and, for greedy requests, the dense no-cache forward); no compilation
after warmup over 1000 steps; bad input answered without harming other requests."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from flax import nnx

from jenga_jax.core.errors import RequestError, RequestTooLargeError
from jenga_jax.core.invariants import check_manager
from jenga_jax.core.kv_cache_manager import KVCacheManager
from jenga_jax.core.page_plan import make_plan
from jenga_jax.core.request import ImageInput
from jenga_jax.engine.compile_counter import CompileCounter
from jenga_jax.engine.llm_engine import Engine
from jenga_jax.engine.model_runner import Image
from jenga_jax.engine.sampling import SamplingParams
from jenga_jax.engine.scheduler import SchedulerConfig
from models import HybridDecoder, tiny_config
from models.random_init import perturb

SCHED = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48, max_prefill_rows=2)
MAX_LEN = 160
MAX_ENC = 64


@functools.cache
def model(family: str):
    return perturb(HybridDecoder(tiny_config(family), rngs=nnx.Rngs(0)), seed=1)


def interval(family: str) -> int | None:
    return 32 if family == "jamba" else None  # Mamba states: hits at checkpoints


@functools.cache
def engine(family: str, num_large_pages: int) -> Engine:
    """Shared per (family, pool size): compiling is the slow part. Tests leave it idle."""
    return Engine(
        model(family),
        num_large_pages=num_large_pages,
        scheduler=SCHED,
        max_model_len=MAX_LEN,
        max_encoder_tokens=MAX_ENC,
        checkpoint_interval=interval(family),
        seed=7,
    )


def workload(family: str, n: int = 24, seed: int = 0):
    """Requests sharing a system prompt, some repeating an earlier prompt whole, images
    from a pool of three (vision models); greedy and sampled, seeded and not."""
    rng = np.random.default_rng(seed)
    cfg = tiny_config(family)
    system = rng.integers(0, cfg.vocab_size, 40).tolist()
    pool = [
        Image(f"img-{i}", rng.normal(size=(int(rng.integers(12, 30)), cfg.vision_dim or 1)))
        for i in range(3)
    ]
    hot = 12.0 if family == "gemma3" else 0.9  # its logits are sharp: sample for real
    prompts, out = [], []
    for i in range(n):
        if i >= 4 and rng.random() < 0.25:
            prompt = prompts[int(rng.integers(len(prompts)))]
        else:
            prompt = system + rng.integers(0, cfg.vocab_size, int(rng.integers(1, 60))).tolist()
        prompts.append(prompt)
        kind = i % 4
        params = SamplingParams(
            temperature=0.0 if kind == 0 else hot,
            top_k=[0, 0, 40, 0][kind],
            top_p=[1.0, 1.0, 1.0, 0.8][kind],
            seed=None if kind == 1 else i,
            max_tokens=int(rng.integers(4, 40)),
        )
        images = [pool[int(rng.integers(3))]] if cfg.vision_dim else None
        out.append((prompt, params, images))
    return out


def serve(eng: Engine, requests, *, waves: int = 3, ids=None):
    """Add the requests in waves a few steps apart; run to completion. -> their outputs.
    Request ids: `ids`, or r0, r1, ... (unseeded requests sample by engine seed and id)."""
    names = list(ids) if ids is not None else [f"r{i}" for i in range(len(requests))]
    done = {}
    per_wave = -(-len(requests) // waves)
    ids = []
    for w in range(waves):
        for prompt, params, images in requests[w * per_wave : (w + 1) * per_wave]:
            ids.append(eng.add_request(prompt, params, images, request_id=names[len(ids)]))
        for _ in range(5):
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    return [done[rid] for rid in ids]


def assert_no_leak(eng: Engine) -> None:
    check_manager(eng.manager)
    stats = eng.manager.stats()
    assert stats.num_running == 0 and stats.running_bytes == 0
    eng.manager.reset_cache()
    stats = eng.manager.stats()
    assert stats.held_bytes == 0 and stats.empty_bytes == stats.pool_bytes


@functools.cache
def tightest_pool(family: str) -> int:
    """Fewest large pages that accept every request of `workload(family)`."""
    cfg = tiny_config(family)
    plan = make_plan(cfg.layout(cfg.dtype, interval(family)), "jenga", 16)
    for n in range(1, 10_000):
        manager = KVCacheManager(plan.layout, n * plan.large_page_bytes, plan=plan)
        try:
            for i, (prompt, params, images) in enumerate(workload(family)):
                ims = [ImageInput(im.content_hash, len(im.embeds)) for im in images or ()]
                manager.add_request(
                    str(i), prompt, images=ims, max_new_tokens=params.max_tokens,
                    prefill_chunk=SCHED.prefill_chunk,
                )  # fmt: skip
        except RequestTooLargeError:
            continue
        return n
    raise AssertionError("no pool fits")


@pytest.mark.parametrize("family", ["llama-vision", "gemma3", "jamba"])
def test_tokens_under_preemption_equal_a_pool_that_never_preempts(family):
    requests = workload(family)
    small = tightest_pool(family) + 1
    eng_small, eng_large = engine(family, small), engine(family, 40 * small)
    pre_small, pre_large = eng_small.scheduler.num_preemptions, eng_large.scheduler.num_preemptions
    hits0 = eng_small.manager.hit_tokens
    tight = serve(eng_small, requests)
    roomy = serve(eng_large, requests, waves=1)
    assert eng_small.scheduler.num_preemptions - pre_small >= 5  # heavy preemption
    assert eng_large.scheduler.num_preemptions == pre_large  # never
    assert eng_small.manager.hit_tokens > hits0  # prefix-cache reuse happened
    for a, b in zip(tight, roomy):
        assert a.output_token_ids == b.output_token_ids, a.request_id
        assert a.finish_reason == b.finish_reason
    # Greedy requests: every token is the dense no-cache forward's argmax (one padded
    # batch: causal, so padding after a sequence changes none of its logits). Sampled
    # requests must leave the argmax somewhere, or this test would not check sampling.
    seqs = [list(r[0]) + list(o.output_token_ids) for r, o in zip(requests, roomy)]
    tokens = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, seq in enumerate(seqs):
        tokens[i, : len(seq)] = seq
    kw = {}
    if tiny_config(family).vision_dim:
        embeds = [np.asarray(r[2][0].embeds, np.float32) for r in requests]
        image = np.zeros((len(seqs), max(map(len, embeds)), embeds[0].shape[1]), np.float32)
        for i, e in enumerate(embeds):
            image[i, : len(e)] = e
        kw = dict(image_embeds=image, image_lens=np.array([len(e) for e in embeds]))
    logits = np.asarray(model(family).forward_dense(tokens, **kw))  # [B, T, V]
    off_argmax = 0
    for i, ((prompt, params, _), out) in enumerate(zip(requests, roomy)):
        argmax = logits[i, len(prompt) - 1 : len(seqs[i]) - 1].argmax(-1).tolist()
        if params.temperature == 0.0:
            assert argmax == list(out.output_token_ids), out.request_id
        else:
            off_argmax += sum(a != t for a, t in zip(argmax, out.output_token_ids))
    assert off_argmax > 0
    assert_no_leak(eng_small)
    assert_no_leak(eng_large)


def test_no_compilation_after_warmup_over_1000_steps():
    eng = engine("gemma3", tightest_pool("gemma3") + 1)
    eng.warmup()
    rng = np.random.default_rng(3)
    steps = 0
    with CompileCounter() as compiles:
        while steps < 1000:
            while eng.num_waiting < 4:
                params = SamplingParams(
                    temperature=float(rng.choice([0.0, 0.8])),
                    top_k=int(rng.choice([0, 20])),
                    max_tokens=int(rng.integers(1, 60)),
                )
                prompt = rng.integers(0, 256, int(rng.integers(1, 90))).tolist()
                eng.add_request(prompt, params)
            eng.step()
            steps += 1
    assert dict(compiles.counts) == {}
    assert eng.counters.steps >= 1000
    for rid in list(eng._requests):
        eng.abort(rid)
    assert_no_leak(eng)


BAD = [
    ("empty prompt", dict(prompt=[])),
    ("id >= vocab", dict(prompt=[1, 2, 256])),
    ("negative id", dict(prompt=[1, -3])),
    ("float id", dict(prompt=[1, 2.5])),
    ("str prompt", dict(prompt="hello")),
    ("too long", dict(prompt=[1] * 150, params=dict(max_tokens=20))),
    ("bad image width", dict(images=[Image("x", np.ones((5, 7)))])),
    ("empty image", dict(images=[Image("x", np.ones((0, 48)))])),
    ("nan image", dict(images=[Image("x", np.full((4, 48), np.nan))])),
    ("too many image tokens", dict(images=[Image("x", np.ones((MAX_ENC + 1, 48)))])),
    ("not an Image", dict(images=[np.ones((4, 48))])),
    ("top_k > vocab", dict(params=dict(top_k=1000))),
    ("stop id >= vocab", dict(params=dict(stop_token_ids=(300,)))),
]


ABSURD = [
    dict(temperature=-1.0),
    dict(temperature=float("nan")),
    dict(top_p=0.0),
    dict(top_p=1.5),
    dict(top_k=-2),
    dict(seed=-1),
    dict(max_tokens=0),
    dict(max_tokens=10**12),
]


@pytest.mark.parametrize("params", ABSURD)
def test_absurd_sampling_params_are_refused(params):
    with pytest.raises(RequestError, match="SamplingParams"):
        SamplingParams(**params)


def test_bad_input_is_refused_and_the_engine_keeps_serving():
    eng = engine("llama-vision", 40 * (tightest_pool("llama-vision") + 1))
    good = workload("llama-vision", n=6, seed=5)
    ids = [eng.add_request(p, s, im, request_id=f"good-{i}") for i, (p, s, im) in enumerate(good)]
    for _ in range(3):
        eng.step()
    held = eng.manager.stats().running_bytes
    for what, bad in BAD:
        prompt = bad.get("prompt", [1, 2, 3])
        params = SamplingParams(**bad.get("params", {}))
        images = bad.get("images")
        with pytest.raises(RequestError):
            eng.add_request(prompt, params, images, request_id=f"bad-{what}")
        assert f"bad-{what}" not in eng.manager, what
    with pytest.raises(RequestError, match="unknown request"):
        eng.abort("never-added")
    with pytest.raises(RequestError, match="already exists"):
        eng.add_request([1, 2], SamplingParams(), None, request_id="good-0")
    with pytest.raises(RequestError):  # the wrong type for params
        eng.add_request([1, 2], dict(temperature=0.5))
    with pytest.raises(RequestTooLargeError):  # could never fit: refused, no deadlock
        tiny_pool = Engine(
            model("gemma3"), num_large_pages=2, scheduler=SCHED, max_model_len=MAX_LEN
        )
        tiny_pool.add_request(list(range(150)), SamplingParams(max_tokens=8))
    assert eng.manager.stats().running_bytes == held  # nothing was taken
    # Abort one running and one waiting request: their pages go back at once.
    eng.add_request([5] * 30, SamplingParams(max_tokens=30), request_id="waiting")
    running = next(r.request_id for r in eng.scheduler.running)
    before = eng.manager.stats().running_bytes
    aborted = eng.abort(running)
    assert aborted.finish_reason == "abort" and aborted.finished
    assert eng.manager.stats().running_bytes < before
    assert running not in eng.manager
    eng.abort("waiting")
    with pytest.raises(RequestError, match="unknown request"):
        eng.abort(running)  # already finished
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    left = [rid for rid in ids if rid != running]
    assert all(outs[rid].finished for rid in left)
    tight = engine("llama-vision", tightest_pool("llama-vision") + 1)
    fresh = serve(tight, [good[ids.index(rid)] for rid in left], waves=1, ids=left)
    assert [o.output_token_ids for o in fresh] == [outs[rid].output_token_ids for rid in left]
    assert_no_leak(eng)


def test_generate_and_stream():
    eng = engine("gemma3", 40 * (tightest_pool("gemma3") + 1))
    prompts = [[1, 2, 3, 4], [9] * 20, list(range(50))]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    outs = eng.generate(prompts, params)
    assert [len(o.output_token_ids) for o in outs] == [6, 6, 6]
    assert all(o.finish_reason == "length" for o in outs)
    streamed = list(eng.stream(prompts[1], params))
    assert streamed == list(outs[1].output_token_ids)
    stop = outs[2].output_token_ids[2]
    stopped = eng.generate([prompts[2]], SamplingParams(temperature=0.0, max_tokens=6,
                                                        stop_token_ids=(stop,)))[0]  # fmt: skip
    first = list(outs[2].output_token_ids).index(stop)
    assert stopped.output_token_ids == outs[2].output_token_ids[: first + 1]
    assert stopped.finish_reason == "stop"
    gen = eng.stream(list(range(40)), SamplingParams(max_tokens=30))
    next(gen)
    gen.close()  # closing a stream early aborts its request
    assert not eng.has_unfinished()
    with pytest.raises(RequestError):  # one bad prompt: none is queued
        eng.generate([[1, 2], []], params)
    assert not eng.has_unfinished()
    assert_no_leak(eng)
