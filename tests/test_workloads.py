"""Synthetic workloads, the JSONL trace format and the workload summary."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

from jenga_jax.core.errors import RequestError
from jenga_jax.core.request import ImageInput, TraceRequest
from jenga_jax.core.workloads import (
    WORKLOADS,
    arxiv_qa_like,
    load_trace,
    make_workload,
    mmmu_like,
    save_trace,
    shared_prefix_lengths,
    sharegpt_like,
    summarize,
)


def _near(value: float, target: float, rel: float) -> bool:
    return abs(value - target) <= rel * target


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_deterministic_for_seed(name):
    a = make_workload(name, 30, seed=7)
    assert a == make_workload(name, 30, seed=7)
    assert a != make_workload(name, 30, seed=8)
    assert len(a) == 30
    assert len({r.request_id for r in a}) == 30
    assert all(0 <= t < 32000 for r in a for t in r.prompt_token_ids)
    assert all(r.output_len >= 1 and r.arrival == 0.0 for r in a)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_poisson_arrivals(name):
    reqs = make_workload(name, 50, seed=1, arrival_rate=10.0)
    times = [r.arrival for r in reqs]
    assert times == sorted(times) and times[0] > 0
    assert 2.0 < times[-1] < 10.0  # ~5 s for 50 requests at 10/s
    # arrivals are drawn last: the content does not depend on the rate
    same = make_workload(name, 50, seed=1)
    assert [r.prompt_token_ids for r in reqs] == [r.prompt_token_ids for r in same]


def test_make_workload_unknown_name():
    with pytest.raises(ValueError, match="known workloads.*arxiv-qa.*mmmu.*sharegpt"):
        make_workload("nope", 3, seed=0)


def test_mmmu_means():
    reqs = mmmu_like(500, seed=0)
    s = summarize(reqs)
    assert _near(s["mean_image_tokens"], 6193, 0.05)
    assert _near(s["mean_prompt_tokens"], 43, 0.05)
    assert _near(s["mean_output_tokens"], 64, 0.15)
    assert len({r.images[0].content_hash for r in reqs}) == 500
    assert all(len(r.images) == 1 and r.images[0].offset == 1 for r in reqs)


def test_mmmu_inline_placeholders_at_offsets():
    vocab = 1000
    reqs = mmmu_like(20, seed=3, vocab_size=vocab, inline_images=True)
    text = mmmu_like(20, seed=3, vocab_size=vocab)
    for r, t in zip(reqs, text, strict=True):
        (im,) = r.images
        ids = r.prompt_token_ids
        assert ids[im.offset : im.offset + im.num_tokens] == (vocab - 1,) * im.num_tokens
        rest = ids[: im.offset] + ids[im.offset + im.num_tokens :]
        assert vocab - 1 not in rest
        assert rest == t.prompt_token_ids  # same text as the cross-attention variant


def test_arxiv_qa_shares_documents():
    reqs = arxiv_qa_like(200, seed=0)
    s = summarize(reqs)
    assert s["shared_prefix_fraction"] > 0.5
    docs = Counter(r.prompt_token_ids[:64] for r in reqs)
    assert max(docs.values()) >= 3
    # questions of a document are not all back to back
    first = [r.prompt_token_ids[:64] for r in reqs]
    assert sum(a != b for a, b in itertools.pairwise(first)) > len(docs)


def test_sharegpt_means_and_multi_turn():
    reqs = sharegpt_like(2000, seed=0)
    s = summarize(reqs)
    assert _near(s["mean_total_tokens"], 1085, 0.08)
    assert all(4 <= len(r.prompt_token_ids) <= 8192 and 1 <= r.output_len <= 2048 for r in reqs)
    shared = shared_prefix_lengths(reqs)
    follow_ups = sum(n >= 4 for n in shared)
    assert 0.15 * 2000 < follow_ups < 0.35 * 2000
    assert s["shared_prefix_fraction"] > 0.05
    single = summarize(sharegpt_like(300, seed=0, multi_turn_prob=0.0))
    assert single["shared_prefix_fraction"] < 0.01


def test_shared_prefix_lengths_exact():
    a = TraceRequest("a", (1, 2, 3, 4), 1)
    b = TraceRequest("b", (1, 2, 9), 1)
    c = TraceRequest("c", (1, 2, 3, 5, 6), 1)
    d = TraceRequest("d", (1, 2, 3, 4), 1, salt="other")  # other tenant: no sharing
    e = TraceRequest("e", (7, 0, 0), 1, (ImageInput("x", 2, 1),))
    f = TraceRequest("f", (7, 0, 0), 1, (ImageInput("y", 2, 1),))  # other image
    g = TraceRequest("g", (7, 0, 0, 8), 1, (ImageInput("x", 2, 1),))
    assert shared_prefix_lengths([a, b, c, d, e, f, g]) == [0, 2, 3, 0, 0, 1, 3]
    s = summarize([a, b, c])
    assert s["shared_prefix_fraction"] == pytest.approx(5 / 12)
    assert s["mean_total_tokens"] == pytest.approx(1 + 12 / 3)
    assert summarize([])["num_requests"] == 0


def test_save_load_round_trip(tmp_path):
    reqs = mmmu_like(5, seed=1, arrival_rate=2.0, inline_images=True)
    reqs += sharegpt_like(5, seed=1)
    reqs.append(TraceRequest("t", (5, 6), 3, salt="s1", adapter="lora"))
    path = tmp_path / "trace.jsonl"
    save_trace(path, reqs)
    assert load_trace(path) == reqs
    lines = path.read_text().splitlines()
    assert len(lines) == len(reqs)
    assert "salt" not in json.loads(lines[-2]) and "images" not in json.loads(lines[-2])


def _write(tmp_path, *objs):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n")
    return path


GOOD = {"request_id": "ok", "prompt_token_ids": [1, 2], "output_len": 4}


@pytest.mark.parametrize(
    "bad, problem",
    [
        ({"request_id": "x", "prompt_token_ids": [1]}, "missing key 'output_len'"),
        ({"request_id": "x", "prompt_token_ids": [], "output_len": 2}, "empty prompt"),
        ({"request_id": "x", "prompt_token_ids": [1], "output_len": -2}, "negative"),
        ({"request_id": "x", "prompt_token_ids": [1], "output_len": 0}, "output_len"),
        ({"request_id": "x", "prompt_token_ids": "12", "output_len": 2}, "list of ints"),
        ({"request_id": "x", "prompt_len": 2.5, "output_len": 2}, "must be an int"),
        ({"request_id": "x", "prompt_len": -1, "output_len": 2}, "negative"),
        ({"request_id": "x", "prompt_len": 2, "output_len": 2, "colour": 1}, "unknown keys"),
        (
            {
                "request_id": "x",
                "prompt_len": 2,
                "output_len": 2,
                "images": [{"content_hash": "h", "num_tokens": 0}],
            },
            "num_tokens must be positive",
        ),
        ({"request_id": "ok", "prompt_len": 2, "output_len": 2}, "duplicate request_id"),
        ({"request_id": "x", "prompt_len": 2, "output_len": 2, "arrival": -1}, "arrival"),
        ('{"request_id": "x", "prompt_len": 2, "output_len": 2, "arrival": NaN}', "arrival"),
        ("{not json", "line 3"),
    ],
)
def test_load_errors_name_the_line(tmp_path, bad, problem):
    path = _write(tmp_path, GOOD, "", bad)  # the bad line is line 3
    with pytest.raises(ValueError, match="line 3") as info:
        load_trace(path)
    assert isinstance(info.value, RequestError)
    assert problem in str(info.value)


def test_prompt_len_form(tmp_path):
    path = _write(
        tmp_path,
        {"request_id": "a", "prompt_len": 10, "output_len": 3},
        {"request_id": "b", "prompt_len": 10, "output_len": 3, "arrival": 1},
    )
    a, b = load_trace(path, vocab_size=50)
    assert len(a.prompt_token_ids) == 10 and all(0 <= t < 50 for t in a.prompt_token_ids)
    assert a.prompt_token_ids != b.prompt_token_ids and b.arrival == 1.0
    assert load_trace(path, vocab_size=50)[0] == a  # deterministic from the request_id
