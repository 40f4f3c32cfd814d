"""The sampling stage: greedy, top-k / top-p, reproducible key streams, bad parameters."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import given, settings

from jenga_jax.core.errors import RequestError
from jenga_jax.engine.compile_counter import CompileCounter
from jenga_jax.engine.sampling import (
    FULL_SORT,
    GREEDY,
    NUCLEUS,
    TEMPERATURE,
    TOP_K,
    SamplerBatch,
    SamplingParams,
    _sample_rows,
    finished,
    id_stream,
    request_key,
    row_keys,
    sample,
    sample_full_sort,
    sample_rows,
    sampling_probs,
    step_key,
)

V = 8  # tiny vocab for the distribution tests


def _cols(b, temperature=1.0, top_k=0, top_p=1.0):
    """Per-row parameter arrays [b] for `sample`."""
    return (
        np.full(b, temperature, np.float32),
        np.full(b, top_k, np.int32),
        np.full(b, top_p, np.float32),
    )


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def _ref_probs(logits, t, k, p):
    """numpy float64 reference of the distribution a row samples from, by token id."""
    logits = np.asarray(logits, np.float64)
    order = np.argsort(-logits, kind="stable")  # ties: lowest id first
    out = np.zeros(len(logits))
    if t == 0:
        out[order[0]] = 1.0
        return out
    q = np.exp((logits[order] - logits[order[0]]) / t)
    if 0 < k < len(q):
        q[k:] = 0
    q /= q.sum()
    if p < 1:
        before = np.concatenate([[0.0], np.cumsum(q)[:-1]])
        q[before >= p] = 0  # the minimal prefix whose mass reaches p
    out[order] = q / q.sum()
    return out


# ----- greedy and top-k = 1 -------------------------------------------------------------


def test_greedy_equals_argmax_with_ties():
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 3, (64, 50)).astype(np.float32)  # many ties
    logits[0, :] = 0.0
    logits[0, 3] = -0.0  # -0.0 == 0.0: np.argmax takes id 0
    logits[1, :] = -np.inf
    logits[1, 7] = 2.0
    top_k = rng.integers(0, 50, 64).astype(np.int32)  # ignored by greedy rows
    top_p = rng.uniform(0.05, 1.0, 64).astype(np.float32)
    tokens = sample(logits, np.zeros(64, np.float32), top_k, top_p, _keys(64))
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=1))


@pytest.mark.parametrize("temperature", [1e-30, 0.3, 1.0, 7.0, 1e30])
def test_top_k_1_is_greedy_at_any_temperature(temperature):
    rng = np.random.default_rng(1)
    logits = rng.integers(-2, 2, (64, 50)).astype(np.float32) * 100
    t, _, p = _cols(64, temperature)
    tokens = sample(logits, t, np.ones(64, np.int32), p, _keys(64, seed=3))
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=1))


# ----- reproducibility -------------------------------------------------------------------


def _logits_at(position, vocab=32):
    """Fixed logits for a position, as a model would give after the same prefix."""
    return np.random.default_rng(position).normal(0, 2, vocab).astype(np.float32)


def _generate(params, rid, positions, *, row=0, batch=1, others=(), engine_seed=7, vocab=32):
    """Tokens of request `rid` at `positions`, placed at `row` among `others` rows."""
    tokens = []
    for pos in positions:
        rows = list(others)
        rows.insert(row, (params, rid, pos, _logits_at(pos, vocab)))
        logits = np.stack([lg for *_, lg in rows])  # SamplerBatch zero-pads to `batch`
        batch_obj = SamplerBatch.build(
            [r[0] for r in rows], [r[2] for r in rows], [r[1] for r in rows],
            vocab_size=vocab, engine_seed=engine_seed, batch_size=batch,
        )  # fmt: skip
        tokens.append(int(batch_obj.sample(logits)[row]))
    return tokens


def _others(n, vocab=32, seed=5):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        params = SamplingParams(
            temperature=float(rng.choice([0.0, 0.5, 1.3])),
            top_k=int(rng.integers(0, vocab)),
            top_p=float(rng.uniform(0.1, 1.0)),
            seed=int(rng.integers(0, 2**32)) if i % 2 else None,
        )
        rows.append((params, f"other{i}", int(rng.integers(0, 1000)), rng.normal(size=vocab)))
    return [(p, rid, pos, lg.astype(np.float32)) for p, rid, pos, lg in rows]


@pytest.mark.parametrize("seed", [42, None])
def test_tokens_are_batch_invariant_and_recomputable(seed):
    """Same tokens alone, in another row of a bigger padded batch with other parameters,
    and when recomputed at the same positions (after preemption)."""
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=seed)
    positions = range(10, 40)
    alone = _generate(params, "r1", positions)
    assert len(set(alone)) > 3  # actually sampled
    assert _generate(params, "r1", positions, row=2, batch=4, others=_others(3)) == alone
    assert _generate(params, "r1", positions, row=5, batch=8, others=_others(6, seed=9)) == alone
    assert _generate(params, "r1", positions[15:]) == alone[15:]  # recompute from position 25
    # a seeded request depends only on its seed; an unseeded one on the id and engine seed
    other_id = _generate(params, "r2", positions)
    assert (other_id == alone) == (seed is not None)
    other_engine = _generate(params, "r1", positions, engine_seed=8)
    assert (other_engine == alone) == (seed is not None)


def test_different_seeds_differ():
    flat = SamplingParams(temperature=1.0, seed=1)
    a = _generate(flat, "r", range(30))
    b = _generate(SamplingParams(temperature=1.0, seed=2), "r", range(30))
    assert a != b
    assert a == _generate(flat, "r", range(30))


def test_row_keys_equal_the_host_key_stream():
    seeds = np.array([0, 1, 2**32 - 1, 42], np.uint32)
    streams = np.array([0, 5, 2**31 + 3, id_stream("abc")], np.uint32)
    positions = np.array([0, 17, 2**32 - 1, 3], np.uint32)
    batched = jax.random.key_data(row_keys(seeds, streams, positions))
    for i in range(4):
        key = step_key(request_key(int(seeds[i]), int(streams[i])), int(positions[i]))
        np.testing.assert_array_equal(batched[i], jax.random.key_data(key))


def test_request_id_hash_is_stable():
    """blake2b, not Python's salted hash(): the same stream in every process."""
    assert id_stream("req-0") == 1363349274
    assert id_stream("chat-42") == 2540073005


# ----- the distribution ------------------------------------------------------------------

CONFIGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.5, 0, 1.0),
    (2.0, 3, 1.0),
    (1.0, 0, 0.7),
    (1.5, 5, 0.8),
    (0.0, 4, 0.5),
]


def test_empirical_distribution_matches_restricted_softmax():
    """One batch mixing every config: 20k draws each, total variation < 0.015 from the
    numpy reference, never a token outside the top-k / top-p set."""
    logits = np.array([1.0, 2.5, -1.0, 0.3, 2.0, -0.5, 1.2, 0.0], np.float32)
    n = 20_000
    t = np.repeat([c[0] for c in CONFIGS], n).astype(np.float32)
    k = np.repeat([c[1] for c in CONFIGS], n).astype(np.int32)
    p = np.repeat([c[2] for c in CONFIGS], n).astype(np.float32)
    rows = np.broadcast_to(logits, (len(t), V))
    tokens = np.asarray(sample(rows, t, k, p, _keys(len(t), seed=11)))
    probs = np.asarray(sampling_probs(rows[::n], t[::n], k[::n], p[::n]))
    for i, (temp, top_k, top_p) in enumerate(CONFIGS):
        ref = _ref_probs(logits, temp, top_k, top_p)
        np.testing.assert_allclose(probs[i], ref, atol=1e-6)
        freq = np.bincount(tokens[i * n : (i + 1) * n], minlength=V) / n
        assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(ref)), (CONFIGS[i], freq, ref)
        assert 0.5 * np.abs(freq - ref).sum() < 0.015, (CONFIGS[i], freq, ref)


def test_sampling_probs_match_the_reference():
    rng = np.random.default_rng(4)
    b, vocab = 300, 40
    logits = rng.normal(0, 3, (b, vocab)).astype(np.float32)
    t = rng.choice([0.0, 0.2, 1.0, 3.0], b).astype(np.float32)
    k = rng.integers(0, vocab + 1, b).astype(np.int32)
    p = rng.choice([1.0, 0.9, 0.5, 0.1], b).astype(np.float32)
    probs = np.asarray(sampling_probs(logits, t, k, p))
    for i in range(b):
        np.testing.assert_allclose(probs[i], _ref_probs(logits[i], t[i], k[i], p[i]), atol=2e-6)


@pytest.mark.parametrize(
    "top_p, nucleus",
    [(0.3, {3}), (0.5, {3}), (0.6, {3, 0}), (0.8, {3, 0, 1}), (0.9, {3, 0, 1, 5}), (1.0, None)],
)
def test_top_p_takes_the_minimal_nucleus(top_p, nucleus):
    """Probabilities 1/2, 1/4, 1/8, 1/8 (ids 3, 0, then a tie of 1 and 5), the rest ~0:
    the nucleus is the shortest prefix reaching top_p; the tie goes to the lower id."""
    probs = np.full(V, 1e-30)
    probs[[3, 0, 1, 5]] = [0.5, 0.25, 0.125, 0.125]
    logits = np.log(probs).astype(np.float32)
    n = 4000
    t, k, p = _cols(n, 1.0, 0, top_p)
    support = np.flatnonzero(np.asarray(sampling_probs(logits[None], t[:1], k[:1], p[:1]))[0])
    tokens = set(np.asarray(sample(np.broadcast_to(logits, (n, V)), t, k, p, _keys(n))).tolist())
    if nucleus is None:  # off: every token keeps its (tiny) probability
        assert set(support) == set(range(V)) and tokens == {3, 0, 1, 5}
    else:
        assert set(support) == nucleus and tokens == nucleus


def test_top_k_ties_go_to_the_lower_id():
    logits = np.array([0.0, 1.0, 3.0, 1.0, 3.0, 1.0, 0.0, -1.0], np.float32)
    t, k, p = _cols(1, 1.0, 3)
    support = np.flatnonzero(np.asarray(sampling_probs(logits[None], t, k, p))[0])
    assert support.tolist() == [1, 2, 4]


# ----- the fast paths --------------------------------------------------------------------

_rows_and_paths = jax.jit(_sample_rows, static_argnums=5)  # (tokens, logprobs, paths)

PATH_CONFIGS = [  # (temperature, top_k, top_p, path) with max_top_k = 4, V = 8
    (0.0, 2, 0.5, GREEDY),
    (0.7, 3, 1.0, TOP_K),
    (1.6, 4, 0.6, TOP_K),
    (0.6, 0, 1.0, TEMPERATURE),
    (1.7, 8, 1.0, TEMPERATURE),  # top_k == V is off
    (0.8, 0, 0.8, NUCLEUS),  # nucleus {1, 4, 6}: within the 4 candidates
    (1.4, 0, 0.97, FULL_SORT),  # nucleus of 7 tokens: wider than the candidates
    (0.9, 6, 1.0, FULL_SORT),  # top_k > max_top_k
    (1.3, 6, 0.9, FULL_SORT),
]
CHI2_AT_1E6 = {1: 23.9, 2: 27.6, 3: 30.7, 4: 33.4, 5: 35.9, 6: 38.3, 7: 40.5}  # by dof


def test_every_path_draws_the_restricted_softmax():
    """20k draws per config, one mixed batch: the path each row takes, never a token outside
    the support, a chi-square test at p = 1e-6 and total variation < 0.015 against the
    numpy reference, and logprobs = log of the reference probability of the token."""
    logits = np.array([1.0, 2.5, -1.0, 0.3, 2.0, -0.5, 1.2, 0.0], np.float32)
    n = 20_000
    t, k, p = (np.repeat([c[i] for c in PATH_CONFIGS], n).astype(dt)
               for i, dt in enumerate((np.float32, np.int32, np.float32)))  # fmt: skip
    rows = np.broadcast_to(logits, (len(t), V))
    tokens, logprobs, paths = map(np.asarray, _rows_and_paths(rows, t, k, p, _keys(len(t)), 4))
    for i, (temp, top_k, top_p, path) in enumerate(PATH_CONFIGS):
        part = slice(i * n, (i + 1) * n)
        assert (paths[part] == path).all(), (PATH_CONFIGS[i], np.unique(paths[part]))
        ref = _ref_probs(logits, temp, top_k, top_p)
        support = np.flatnonzero(ref)
        count = np.bincount(tokens[part], minlength=V)
        assert set(np.flatnonzero(count)) <= set(support), (PATH_CONFIGS[i], count, ref)
        np.testing.assert_allclose(logprobs[part], np.log(ref[tokens[part]]), atol=1e-5)
        if len(support) > 1:
            expected = n * ref[support]
            chi2 = np.sum((count[support] - expected) ** 2 / expected)
            assert chi2 < CHI2_AT_1E6[len(support) - 1], (PATH_CONFIGS[i], count / n, ref)
        assert 0.5 * np.abs(count / n - ref).sum() < 0.015, (PATH_CONFIGS[i], count / n, ref)


def test_a_row_draws_the_same_token_whatever_the_batch_runs():
    """A row's token and logprob are the same alone among its own kind, when a FULL_SORT
    row makes the batch sort, in another order, and in a bigger batch."""
    rng = np.random.default_rng(2)
    vocab, per = 64, 200
    configs = [(0.0, 0, 1.0), (0.8, 5, 1.0), (1.3, 8, 0.7), (0.9, 0, 1.0), (1.1, 0, 0.3)]
    t, k, p = (np.repeat([c[i] for c in configs], per).astype(dt)
               for i, dt in enumerate((np.float32, np.int32, np.float32)))  # fmt: skip
    logits = (rng.standard_normal((len(t), vocab)) * 3).astype(np.float32)
    keys = jax.random.key_data(_keys(len(t), seed=5))  # raw uint32 [B, 2]
    alone = [np.asarray(x) for x in _rows_and_paths(logits, t, k, p, keys, 8)]
    assert set(alone[2]) == {GREEDY, TOP_K, TEMPERATURE, NUCLEUS}  # nobody sorts
    sorter = (rng.standard_normal((1, vocab)).astype(np.float32), 1.0, 20, 1.0)  # FULL_SORT
    order = rng.permutation(len(t))
    mixed = [
        np.asarray(x)
        for x in _rows_and_paths(
            np.concatenate([logits[order], sorter[0], logits[:7]]),
            np.append(t[order], [sorter[1]] + [0.5] * 7).astype(np.float32),
            np.append(k[order], [sorter[2]] + [0] * 7).astype(np.int32),
            np.append(p[order], [sorter[3]] + [0.5] * 7).astype(np.float32),
            np.concatenate([keys[order], keys[:8]]),
            8,
        )
    ]
    assert mixed[2][len(t)] == FULL_SORT
    for got, want in zip(mixed, alone):
        np.testing.assert_array_equal(got[: len(t)], want[order])


def test_top_k_candidates_tie_like_the_stable_sort():
    rng = np.random.default_rng(3)
    logits = rng.integers(-3, 3, (64, 40)).astype(np.float32)  # many ties
    values, ids = jax.lax.top_k(logits, 16)
    stable = np.argsort(-logits, axis=1, kind="stable")[:, :16]
    np.testing.assert_array_equal(np.asarray(ids), stable)
    np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(logits, stable, 1))


def test_minus_zero_ties_with_zero_on_every_path():
    """-0.0 == 0.0 as np.argmax sees it: the lower id wins a tie however the row is drawn."""
    logits = np.full((4, 12), -5.0, np.float32)
    logits[:, 2], logits[:, 5] = -0.0, 0.0
    t = np.array([0.0, 1.0, 1.0, 1.0], np.float32)
    k = np.array([0, 1, 0, 6], np.int32)
    p = np.array([1.0, 1.0, 0.1, 0.1], np.float32)
    tokens, logprobs, paths = _rows_and_paths(logits, t, k, p, _keys(4), 4)
    assert np.asarray(paths).tolist() == [GREEDY, TOP_K, NUCLEUS, FULL_SORT]
    assert np.asarray(tokens).tolist() == [2, 2, 2, 2]
    np.testing.assert_array_equal(np.asarray(logprobs), 0.0)


def test_fast_paths_against_the_full_sort_sampler():
    """Greedy, TOP_K and NUCLEUS rows draw the previous (full-sort) sampler's tokens (up to
    float rounding at a CDF boundary: none here); TEMPERATURE rows draw other tokens."""
    rng = np.random.default_rng(6)
    vocab, n = 256, 500
    logits = (rng.standard_normal((n, vocab)) * 4).astype(np.float32)
    for temp, top_k, top_p, same in [
        (0.0, 0, 1.0, True),
        (0.9, 40, 1.0, True),
        (1.2, 30, 0.8, True),
        (0.5, 0, 0.9, True),
        (1.0, 0, 1.0, False),
    ]:
        t, k, p = _cols(n, temp, top_k, top_p)
        keys = _keys(n, seed=top_k)
        new = np.asarray(sample(logits, t, k, p, keys))
        old = np.asarray(sample_full_sort(logits, t, k, p, keys))
        assert (new == old).all() if same else (new != old).mean() > 0.5


def test_sample_rows_compiles_once_for_every_mix():
    rng = np.random.default_rng(8)
    vocab = 11  # shapes no other test uses
    with CompileCounter() as counter:
        for _ in range(8):
            t = rng.choice([0.0, 0.7], 5).astype(np.float32)
            k = rng.choice([0, 2, 6], 5).astype(np.int32)
            p = rng.choice([1.0, 0.9, 0.2], 5).astype(np.float32)
            logits = rng.normal(size=(5, vocab)).astype(np.float32)
            tokens, logprobs = sample_rows(logits, t, k, p, _keys(5), max_top_k=3)
            assert ((0 <= np.asarray(tokens)) & (np.asarray(tokens) < vocab)).all()
            assert (np.asarray(logprobs) <= 0).all()
    assert counter.counts["sample_rows"] == 1, counter.counts


# ----- compiles --------------------------------------------------------------------------


def test_sampler_compiles_once_per_batch_shape():
    """Parameters change every step (greedy / sampled mixes, seeds, positions): one compile
    of `sample` and of `row_keys` per batch bucket."""
    rng = np.random.default_rng(0)
    vocab = 13  # shapes no other test uses
    with CompileCounter() as counter:
        for step in range(30):
            n = int(rng.integers(1, 7))
            params = [
                SamplingParams(
                    temperature=float(rng.choice([0.0, 0.7, 1.0])),
                    top_k=int(rng.integers(0, vocab + 1)),
                    top_p=float(rng.choice([1.0, 0.9, 0.3])),
                    seed=int(rng.integers(0, 100)) if rng.random() < 0.5 else None,
                )
                for _ in range(n)
            ]
            batch = SamplerBatch.build(
                params, [step] * n, [f"r{i}" for i in range(n)],
                vocab_size=vocab, engine_seed=step, batch_size=6,
            )  # fmt: skip
            tokens = batch.sample(rng.normal(size=(n, vocab)).astype(np.float32))
            assert tokens.shape == (n,) and ((0 <= tokens) & (tokens < vocab)).all()
        assert counter.counts["sample"] == 1, counter.counts
        assert counter.counts["row_keys"] == 1, counter.counts
        batch = SamplerBatch.build([SamplingParams()], [0], ["r"], vocab_size=vocab, engine_seed=0,
                                   batch_size=7)  # fmt: skip
        batch.sample(np.zeros((1, vocab), np.float32))
    assert counter.counts["sample"] == 2, counter.counts


# ----- parameters and finishing ----------------------------------------------------------

BAD = [
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", True),
    ("temperature", "1.0"),
    ("top_k", -1),
    ("top_k", 2.0),
    ("top_k", True),
    ("top_k", 2**40),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_p", None),
    ("seed", -1),
    ("seed", 2**32),
    ("seed", 1.5),
    ("seed", False),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 10.0),
    ("max_tokens", True),
    ("stop_token_ids", (1, -2)),
    ("stop_token_ids", (1, 2.0)),
    ("stop_token_ids", (True,)),
    ("stop_token_ids", 5),
    ("stop_token_ids", "ab"),
]


@pytest.mark.parametrize("name, value", BAD)
def test_bad_parameters_raise_naming_the_parameter(name, value):
    with pytest.raises(RequestError, match=name):
        SamplingParams(**{name: value})


@settings(max_examples=60, deadline=None)
@given(
    temperature=st.floats(allow_nan=True, allow_infinity=True),
    top_k=st.integers(-(2**40), 2**40),
    top_p=st.floats(allow_nan=True, allow_infinity=True),
    max_tokens=st.integers(-(2**40), 2**40),
)
def test_parameters_are_accepted_exactly_when_valid(temperature, top_k, top_p, max_tokens):
    checks = {
        "temperature": math.isfinite(temperature) and temperature >= 0,
        "top_k": 0 <= top_k < 2**31,
        "top_p": math.isfinite(top_p) and 0 < top_p <= 1,
        "max_tokens": 1 <= max_tokens < 2**31,
    }
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_tokens)
    if all(checks.values()):
        assert SamplingParams(**kw).top_p == top_p
    else:
        first_bad = next(name for name, ok in checks.items() if not ok)
        with pytest.raises(RequestError, match=first_bad):
            SamplingParams(**kw)


def test_params_are_normalized_and_hashable():
    params = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), stop_token_ids=[2, 9])
    assert params.stop_token_ids == (2, 9) and type(params.top_k) is int
    assert hash(params) == hash(SamplingParams(temperature=0.5, top_k=3, stop_token_ids=(2, 9)))


def test_validate_for_the_vocab():
    SamplingParams(top_k=8, stop_token_ids=(7,)).validate_for(8)
    with pytest.raises(RequestError, match="top_k"):
        SamplingParams(top_k=9).validate_for(8)
    with pytest.raises(RequestError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=(1, 8)).validate_for(8)
    with pytest.raises(RequestError, match="top_k"):  # build checks every row
        SamplerBatch.build([SamplingParams(top_k=9)], [0], ["r"], vocab_size=8, engine_seed=0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(positions=[-1]), "positions"),
        (dict(positions=[2**32]), "positions"),
        (dict(positions=[0, 1]), "positions"),
        (dict(engine_seed=-1), "engine_seed"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_batches_raise(kw, match):
    args = dict(positions=[0], request_ids=["r"], vocab_size=8, engine_seed=0) | kw
    with pytest.raises(RequestError, match=match):
        SamplerBatch.build([SamplingParams()], **args)


def test_finished():
    params = SamplingParams(max_tokens=3, stop_token_ids=(2, 5))
    assert finished(7, params, 1) is None
    assert finished(5, params, 1) == "stop"
    assert finished(7, params, 3) == "length"
    assert finished(2, params, 3) == "stop"  # a stop id wins over the length
    assert finished(0, SamplingParams(max_tokens=1), 1) == "length"
