"""Seeded synthetic workloads shaped like the Jenga paper's, and a JSONL trace format.

Every generator is a pure function of its arguments: it draws from
`numpy.random.default_rng(seed)` and returns `list[TraceRequest]` in arrival order.
Token ids are random ids in [0, vocab_size); only their sharing structure matters:

- `mmmu_like`: one large image (~6193 tokens) + a short question (~43 text tokens).
- `arxiv_qa_like`: long documents (~12000 tokens), each asked 3..8 questions; every
  question's prompt repeats the document's exact ids, then its own question tokens.
- `sharegpt_like`: chat turns of ~1085 prompt+output tokens; some are follow-ups whose
  prompt starts with an earlier turn's prompt and a pseudo-answer.
- `image_questions_like`: questions about a few shared images (the serving demo).

The trace format (`save_trace` / `load_trace`) is JSON Lines, one request per line:

    {"request_id": "r0", "prompt_token_ids": [1, 2, 3], "output_len": 16,
     "images": [{"content_hash": "img-a", "num_tokens": 576, "offset": 1}],
     "arrival": 0.25, "salt": "tenant-1", "adapter": "lora-x"}

`images`, `arrival` (default 0.0), `salt` and `adapter` may be missing. Instead of
`prompt_token_ids` a line may give `"prompt_len": N`; its N ids are then drawn from a
hash of the request_id, so such requests share no prefix with each other: write
explicit ids for prompts that must share a prefix.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from jenga_jax.core.errors import RequestError
from jenga_jax.core.request import ImageInput, TraceRequest

# ----------------------------------------------------------------------------- helpers


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_common(num_requests: int, vocab_size: int, arrival_rate: float | None) -> None:
    _check(
        isinstance(num_requests, int) and num_requests >= 0,
        f"num_requests must be an int >= 0, got {num_requests!r}",
    )
    _check(
        isinstance(vocab_size, int) and vocab_size >= 2,
        f"vocab_size must be an int >= 2, got {vocab_size!r}",
    )
    _check(
        arrival_rate is None or arrival_rate > 0,
        f"arrival_rate must be None or > 0 requests/s, got {arrival_rate!r}",
    )


def _clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    """E[clip(X, lo, hi)] for X ~ lognormal(mu, sigma)."""

    def cdf(z: float) -> float:
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    a, b = math.log(lo), math.log(hi)
    inner = math.exp(mu + sigma**2 / 2) * (
        cdf((b - mu - sigma**2) / sigma) - cdf((a - mu - sigma**2) / sigma)
    )
    return lo * cdf((a - mu) / sigma) + hi * (1.0 - cdf((b - mu) / sigma)) + inner


def _lognormal_ints(
    rng: np.random.Generator, n: int, mean: float, sigma: float, lo: int = 1, hi: int = 1 << 30
) -> np.ndarray:
    """`n` lognormal ints in [lo, hi] whose expected mean (after clipping) is `mean`."""
    if not lo < mean < hi:  # degenerate: every value at the nearer bound
        return np.full(n, lo if mean <= lo else hi, dtype=np.int64)
    left, right = math.log(lo) - 10 * sigma, math.log(hi)
    for _ in range(100):  # bisection on mu: the clipped mean is increasing in mu
        mu = (left + right) / 2
        if _clipped_lognormal_mean(mu, sigma, lo, hi) < mean:
            left = mu
        else:
            right = mu
    x = np.rint(rng.lognormal(mu, sigma, size=n)).astype(np.int64)
    return np.clip(x, lo, hi)


def _poisson_ints(rng: np.random.Generator, n: int, mean: float, lo: int = 1) -> np.ndarray:
    return np.maximum(rng.poisson(mean, size=n), lo).astype(np.int64)


def _tokens(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
    """`n` random token ids in [0, vocab_size) as Python ints."""
    return rng.integers(0, vocab_size, size=int(n)).tolist()


def _arrivals(rng: np.random.Generator, n: int, rate: float | None) -> list[float]:
    """All 0.0 when `rate` is None, else cumulative Poisson arrival times (seconds)."""
    if rate is None:
        return [0.0] * n
    return np.cumsum(rng.exponential(1.0 / rate, size=n)).tolist()


# ----------------------------------------------------------------------------- workloads


def mmmu_like(
    num_requests: int = 200,
    *,
    seed: int = 0,
    vocab_size: int = 32000,
    inline_images: bool = False,
    image_tokens_mean: float = 6193,
    image_tokens_std: float = 600,
    text_tokens_mean: float = 43,
    output_len_mean: float = 64,
    arrival_rate: float | None = None,
) -> list[TraceRequest]:
    """MMMU-like requests: one unique image + a short question each.

    Without `inline_images` (cross-attention models) the prompt is the ~43 text tokens
    and the image sits at offset 1 (after the first text token), outside the prompt.
    With it, the prompt is `[t0] + [vocab_size - 1] * num_tokens + [t1, ...]`: the
    image's placeholder ids fill [1, 1 + num_tokens). Text ids avoid the placeholder.
    """
    _check_common(num_requests, vocab_size, arrival_rate)
    _check(
        image_tokens_mean > 0 and text_tokens_mean > 0 and output_len_mean > 0,
        "image_tokens_mean, text_tokens_mean and output_len_mean must be > 0",
    )
    rng = np.random.default_rng(seed)
    n = num_requests
    placeholder = vocab_size - 1
    img = np.maximum(np.rint(rng.normal(image_tokens_mean, image_tokens_std, n)), 1)
    text = _poisson_ints(rng, n, text_tokens_mean)
    out = _lognormal_ints(rng, n, output_len_mean, 0.6)
    reqs = []
    for i in range(n):
        t = _tokens(rng, text[i], vocab_size - 1)
        image = ImageInput(f"img-{seed}-{i}", int(img[i]), offset=1)
        prompt = t[:1] + [placeholder] * image.num_tokens + t[1:] if inline_images else t
        reqs.append((f"mmmu-{i}", prompt, int(out[i]), image))
    times = _arrivals(rng, n, arrival_rate)
    return [
        TraceRequest(rid, tuple(p), o, (im,), arrival=a)
        for (rid, p, o, im), a in zip(reqs, times, strict=True)
    ]


def _interleaved_order(rng: np.random.Generator, counts: Sequence[int], window: float):
    """(doc, question) pairs sorted so each doc's questions spread over ~`window` slots."""
    keys, pairs, start = [], [], 0
    for d, k in enumerate(counts):
        keys.extend(start + rng.uniform(0, window, size=k))
        pairs.extend((d, q) for q in range(k))
        start += k
    order = np.argsort(np.asarray(keys), kind="stable")
    return [pairs[j] for j in order]


def arxiv_qa_like(
    num_requests: int = 200,
    *,
    seed: int = 0,
    vocab_size: int = 32000,
    doc_tokens_mean: float = 12000,
    doc_tokens_std: float = 3000,
    questions_per_doc: tuple[int, int] = (3, 8),
    question_tokens_mean: float = 40,
    output_len_mean: float = 200,
    arrival_rate: float | None = None,
) -> list[TraceRequest]:
    """arXiv-QA-like requests: prompt = a long document's ids + one question's ids.

    Each document gets uniformly 3..8 (inclusive) questions with identical document
    ids; questions of one document are spread over a window of ~2 * max questions
    nearby requests, interleaved with neighbouring documents'.
    """
    _check_common(num_requests, vocab_size, arrival_rate)
    lo, hi = questions_per_doc
    _check(
        1 <= lo <= hi,
        f"questions_per_doc must be (lo, hi) with 1 <= lo <= hi, got {questions_per_doc!r}",
    )
    _check(
        doc_tokens_mean > 0 and question_tokens_mean > 0 and output_len_mean > 0,
        "doc_tokens_mean, question_tokens_mean and output_len_mean must be > 0",
    )
    rng = np.random.default_rng(seed)
    counts: list[int] = []
    while sum(counts) < num_requests:
        counts.append(int(rng.integers(lo, hi + 1)))
    doc_len = np.maximum(np.rint(rng.normal(doc_tokens_mean, doc_tokens_std, len(counts))), 1)
    docs = [_tokens(rng, m, vocab_size) for m in doc_len]
    order = _interleaved_order(rng, counts, 2.0 * hi)[:num_requests]
    qlen = _poisson_ints(rng, num_requests, question_tokens_mean)
    out = _lognormal_ints(rng, num_requests, output_len_mean, 0.6)
    prompts = [tuple(docs[d] + _tokens(rng, qlen[i], vocab_size)) for i, (d, _) in enumerate(order)]
    times = _arrivals(rng, num_requests, arrival_rate)
    return [
        TraceRequest(f"arxiv-{i}-doc{d}-q{q}", prompts[i], int(out[i]), arrival=times[i])
        for i, (d, q) in enumerate(order)
    ]


def sharegpt_like(
    num_requests: int = 200,
    *,
    seed: int = 0,
    vocab_size: int = 32000,
    total_tokens_mean: float = 1085,
    multi_turn_prob: float = 0.3,
    arrival_rate: float | None = None,
) -> list[TraceRequest]:
    """ShareGPT-like chat turns: prompt ~ lognormal (mean ~800, in [4, 8192]), output
    ~ lognormal (mean ~285, in [1, 2048]), scaled so prompt+output averages
    `total_tokens_mean`.

    With probability `multi_turn_prob` a turn follows up an earlier one: its prompt is
    that turn's prompt + a pseudo-answer (up to its output_len ids, the same ids for
    every follow-up) + new user tokens, at the length drawn for it. A turn for which no
    earlier prompt is short enough (2+ tokens shorter) stays single-turn, so the
    realised follow-up fraction is a little below `multi_turn_prob`.
    """
    _check_common(num_requests, vocab_size, arrival_rate)
    _check(total_tokens_mean > 0, f"total_tokens_mean must be > 0, got {total_tokens_mean!r}")
    _check(
        0.0 <= multi_turn_prob <= 1.0, f"multi_turn_prob must be in [0, 1], got {multi_turn_prob!r}"
    )
    rng = np.random.default_rng(seed)
    n = num_requests
    plen = _lognormal_ints(rng, n, total_tokens_mean * 800 / 1085, 1.0, 4, 8192)
    out = _lognormal_ints(rng, n, total_tokens_mean * 285 / 1085, 0.9, 1, 2048)
    follow = rng.random(n) < multi_turn_prob
    prompts: list[tuple[int, ...]] = []
    answers: dict[int, list[int]] = {}
    for i in range(n):
        length = int(plen[i])
        eligible = np.flatnonzero(plen[:i] + 2 <= length) if follow[i] else ()
        if len(eligible) == 0:
            prompts.append(tuple(_tokens(rng, length, vocab_size)))
            continue
        j = int(eligible[rng.integers(len(eligible))])
        if j not in answers:
            answers[j] = _tokens(rng, out[j], vocab_size)
        prefix = prompts[j] + tuple(answers[j][: length - len(prompts[j]) - 1])
        prompts.append(prefix + tuple(_tokens(rng, length - len(prefix), vocab_size)))
    times = _arrivals(rng, n, arrival_rate)
    return [
        TraceRequest(f"sharegpt-{i}", prompts[i], int(out[i]), arrival=times[i]) for i in range(n)
    ]


def image_questions_like(
    num_requests: int = 48,
    *,
    seed: int = 0,
    vocab_size: int = 32000,
    num_images: int | None = None,
    image_tokens_mean: float = 96,
    system_len: int = 32,
    question_len_mean: float = 24,
    output_len_mean: float = 32,
    arrival_rate: float | None = None,
) -> list[TraceRequest]:
    """Questions about a few images (the serving demo): a shared system prompt + a
    question each, about one of `num_images` images (default: half the requests), so
    later questions reuse an image's cached K/V. Lengths are Poisson around the means;
    images sit outside the prompt (cross-attention models)."""
    _check_common(num_requests, vocab_size, arrival_rate)
    _check(system_len >= 0, f"system_len must be >= 0, got {system_len!r}")
    rng = np.random.default_rng(seed)
    n = num_requests
    num_images = num_images or max(1, n // 2)
    system = _tokens(rng, system_len, vocab_size)
    sizes = _poisson_ints(rng, num_images, image_tokens_mean)
    image = rng.integers(0, num_images, n)
    questions = [_tokens(rng, k, vocab_size) for k in _poisson_ints(rng, n, question_len_mean)]
    out = _poisson_ints(rng, n, output_len_mean)
    times = _arrivals(rng, n, arrival_rate)
    return [
        TraceRequest(
            f"questions-{i}",
            tuple(system + questions[i]),
            int(out[i]),
            (ImageInput(f"img-{seed}-{image[i]}", int(sizes[image[i]])),),
            arrival=times[i],
        )
        for i in range(n)
    ]


WORKLOADS: dict[str, Callable[..., list[TraceRequest]]] = {
    "mmmu": mmmu_like,
    "arxiv-qa": arxiv_qa_like,
    "sharegpt": sharegpt_like,
    "image-questions": image_questions_like,
}


def make_workload(
    name: str, num_requests: int, *, seed: int = 0, **kwargs: Any
) -> list[TraceRequest]:
    """The workload `name` (a key of WORKLOADS) with the given size, seed and options."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known workloads: {sorted(WORKLOADS)}")
    return WORKLOADS[name](num_requests, seed=seed, **kwargs)


# ----------------------------------------------------------------------------- JSONL traces

_KEYS = {
    "request_id",
    "prompt_token_ids",
    "prompt_len",
    "output_len",
    "images",
    "arrival",
    "salt",
    "adapter",
}
_IMAGE_KEYS = {"content_hash", "num_tokens", "offset"}


def _request_to_json(req: TraceRequest) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "request_id": req.request_id,
        "prompt_token_ids": list(req.prompt_token_ids),
        "output_len": req.output_len,
    }
    if req.images:
        obj["images"] = [
            {"content_hash": im.content_hash, "num_tokens": im.num_tokens, "offset": im.offset}
            for im in req.images
        ]
    obj["arrival"] = req.arrival
    for key in ("salt", "adapter"):
        if getattr(req, key) is not None:
            obj[key] = getattr(req, key)
    return obj


def save_trace(path: str | os.PathLike, requests: Iterable[TraceRequest]) -> None:
    """Write `requests` to `path` as JSON Lines (one object per request)."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps(_request_to_json(r), separators=(",", ":")) + "\n" for r in requests
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _get_int(obj: dict, key: str, default: int | None = None) -> int:
    if key not in obj:
        if default is None:
            raise RequestError(f"missing key {key!r}")
        return default
    val = obj[key]
    if not _is_int(val):
        raise RequestError(f"{key!r} must be an int, got {type(val).__name__}")
    if val < 0:
        raise RequestError(f"{key!r} must not be negative, got {val}")
    return val


def _get_str(obj: dict, key: str, required: bool) -> str | None:
    if key not in obj or (obj[key] is None and not required):
        if required:
            raise RequestError(f"missing key {key!r}")
        return None
    if not isinstance(obj[key], str):
        raise RequestError(f"{key!r} must be a str, got {type(obj[key]).__name__}")
    return obj[key]


def _ids_from_request_id(request_id: str, n: int, vocab_size: int) -> tuple[int, ...]:
    """`n` ids in [0, vocab_size), a deterministic function of the request_id."""
    digest = hashlib.sha256(request_id.encode("utf-8")).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return tuple(_tokens(rng, n, vocab_size))


def _parse_prompt(obj: dict, request_id: str, vocab_size: int) -> tuple[int, ...]:
    if ("prompt_token_ids" in obj) == ("prompt_len" in obj):
        raise RequestError("give exactly one of 'prompt_token_ids' and 'prompt_len'")
    if "prompt_len" in obj:
        return _ids_from_request_id(request_id, _get_int(obj, "prompt_len"), vocab_size)
    ids = obj["prompt_token_ids"]
    if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
        raise RequestError("'prompt_token_ids' must be a list of ints")
    if any(t < 0 for t in ids):
        raise RequestError("'prompt_token_ids' must not contain negative ids")
    return tuple(ids)


def _parse_images(obj: dict) -> tuple[ImageInput, ...]:
    images = obj.get("images", [])
    if images is None:
        return ()
    if not isinstance(images, list):
        raise RequestError(f"'images' must be a list, got {type(images).__name__}")
    out = []
    for k, im in enumerate(images):
        if not isinstance(im, dict):
            raise RequestError(f"images[{k}] must be an object")
        if set(im) - _IMAGE_KEYS:
            raise RequestError(f"images[{k}] has unknown keys {sorted(set(im) - _IMAGE_KEYS)}")
        try:
            out.append(
                ImageInput(
                    _get_str(im, "content_hash", True),
                    _get_int(im, "num_tokens"),
                    _get_int(im, "offset", 0),
                )
            )
        except ValueError as e:
            raise RequestError(f"images[{k}]: {e}") from e
    return tuple(out)


def _parse_request(obj: Any, vocab_size: int) -> TraceRequest:
    """One TraceRequest from one decoded JSON line; RequestError says what is wrong."""
    if not isinstance(obj, dict):
        raise RequestError(f"expected a JSON object, got {type(obj).__name__}")
    if set(obj) - _KEYS:
        raise RequestError(f"unknown keys {sorted(set(obj) - _KEYS)}")
    request_id = _get_str(obj, "request_id", True)
    arrival = obj.get("arrival", 0.0)
    if arrival is None:
        arrival = 0.0
    if (
        not isinstance(arrival, (int, float))
        or isinstance(arrival, bool)
        or not 0 <= arrival < math.inf
    ):
        raise RequestError(f"'arrival' must be a number >= 0, got {arrival!r}")
    return TraceRequest(
        request_id,
        _parse_prompt(obj, request_id, vocab_size),
        _get_int(obj, "output_len"),
        _parse_images(obj),
        arrival=float(arrival),
        salt=_get_str(obj, "salt", False),
        adapter=_get_str(obj, "adapter", False),
    )


def load_trace(path: str | os.PathLike, *, vocab_size: int = 32000) -> list[TraceRequest]:
    """Read a JSONL trace written by `save_trace` (or by hand; see the module doc).

    Blank lines are skipped. A bad line raises RequestError (a ValueError) naming the
    file, the line number and the problem; request_ids must be unique.
    """
    requests: list[TraceRequest] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                req = _parse_request(json.loads(line), vocab_size)
                if req.request_id in seen:
                    raise RequestError(
                        f"duplicate request_id {req.request_id!r} "
                        f"(first on line {seen[req.request_id]})"
                    )
            except ValueError as e:  # includes JSONDecodeError and RequestError
                raise RequestError(f"{os.fspath(path)}, line {lineno}: {e}") from e
            seen[req.request_id] = lineno
            requests.append(req)
    return requests


# ----------------------------------------------------------------------------- summary


def _cache_keys(req: TraceRequest, image_ids: dict[str, int]) -> tuple[int, ...]:
    """Prompt ids, with every position an image covers replaced by the image's id (< 0)."""
    if not req.images:
        return req.prompt_token_ids
    keys = list(req.prompt_token_ids)
    for im in req.images:
        neg = image_ids.setdefault(im.content_hash, -1 - len(image_ids))
        end = min(im.offset + im.num_tokens, len(keys))
        keys[im.offset : end] = [neg] * max(0, end - im.offset)
    return tuple(keys)


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    diff = a[:m] != b[:m]
    return int(np.argmax(diff)) if diff.any() else m


def shared_prefix_lengths(requests: Sequence[TraceRequest]) -> list[int]:
    """Per request, its longest common prefix with any earlier request's prompt.

    Only requests of the same (salt, adapter) share, and positions an image covers
    match only the same image (content_hash), not merely equal placeholder ids.
    The best earlier match is a lexicographic neighbour in a sorted list of keys.
    """
    image_ids: dict[str, int] = {}
    groups: dict[tuple, tuple[list, list]] = {}
    result = []
    for req in requests:
        keys = _cache_keys(req, image_ids)
        sorted_keys, arrays = groups.setdefault((req.salt, req.adapter), ([], []))
        pos = bisect.bisect_left(sorted_keys, keys)
        arr = np.asarray(keys, dtype=np.int64)
        best = max(
            (_lcp(arr, arrays[j]) for j in (pos - 1, pos) if 0 <= j < len(arrays)), default=0
        )
        result.append(best)
        sorted_keys.insert(pos, keys)
        arrays.insert(pos, arr)
    return result


def summarize(requests: Sequence[TraceRequest]) -> dict[str, float]:
    """Means per request (prompt, output, image and prompt+output tokens) and
    `shared_prefix_fraction`: the fraction of all prompt tokens that are a prefix
    shared with an earlier request (see `shared_prefix_lengths`)."""
    n = len(requests)
    if n == 0:
        return {
            "num_requests": 0,
            "mean_prompt_tokens": 0.0,
            "mean_output_tokens": 0.0,
            "mean_image_tokens": 0.0,
            "mean_total_tokens": 0.0,
            "shared_prefix_fraction": 0.0,
        }
    prompt = np.array([len(r.prompt_token_ids) for r in requests], dtype=np.float64)
    output = np.array([r.output_len for r in requests], dtype=np.float64)
    image = np.array([r.image_tokens for r in requests], dtype=np.float64)
    shared = sum(shared_prefix_lengths(requests))
    return {
        "num_requests": n,
        "mean_prompt_tokens": float(prompt.mean()),
        "mean_output_tokens": float(output.mean()),
        "mean_image_tokens": float(image.mean()),
        "mean_total_tokens": float((prompt + output).mean()),
        "shared_prefix_fraction": float(shared / prompt.sum()),
    }
