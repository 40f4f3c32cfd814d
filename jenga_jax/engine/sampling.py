"""Sampling: per-request parameters, a jitted batched sampler, reproducible key streams.

A step's logits [B, V] (float32) become one token per row: `sample_rows` is pure and
jittable, so it runs inside the jitted model step and only token ids (and logprobs) reach
the host. Each row has its own temperature, top-k, top-p and PRNG key, so every mix shares
one compiled function; only the shapes (batch bucket, vocab) compile. A row draws with one
uniform from its key, on a path chosen by its own parameters (and, for top-p, its own
logits), so its token never depends on the other rows. A path runs (`lax.cond`) only when
some row of the batch takes it; the full sort runs on its own rows only, SORT_ROWS at a time:

- GREEDY (T == 0): argmax, lowest id on ties. The same token as the previous sampler.
- TOP_K (0 < top_k <= max_top_k): the `lax.top_k` candidates, inverse CDF in sorted order.
  The previous sampler's token, up to float rounding at a CDF boundary.
- NUCLEUS (top-k off, top_p < 1, nucleus within the max_top_k best): as TOP_K, same token.
- TEMPERATURE (top-k and top-p off): inverse CDF over the ids in natural order, no sort.
  The exact distribution, but NOT the previous sampler's token for the same key.
- FULL_SORT (the rest: max_top_k < top_k < V, or a wider nucleus): the previous sampler,
  a stable sort of the whole vocab; the same token.

A request's key at a position is ``step_key(request_key(seed, stream), position)``: its
tokens depend on its seed and the positions it samples at, not on the batch, the row, or
a recompute after preemption.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jenga_jax.core.errors import RequestError

UINT32 = 2**32  # seeds, key streams and positions are uint32 (jax.random.fold_in data)
INT32_MAX = 2**31 - 1


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
        x, (bool, np.bool_)
    )


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples.

    temperature: >= 0, 0 = greedy (argmax, lowest id on ties); top_k: >= 0, 0 = off;
    top_p: in (0, 1], 1 = off (top-k applies first, top-p to the renormalized rest);
    seed: in [0, 2**32), or None to derive one from the engine seed and the request id;
    max_tokens: >= 1 tokens to generate; stop_token_ids: ids that end the request;
    logprobs: keep each sampled token's log-probability (``RequestOutput.output_logprobs``).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False

    def __post_init__(self):
        def bad(name: str, expected: str):
            value = getattr(self, name)
            raise RequestError(f"SamplingParams.{name} must be {expected}, got {value!r}")

        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= INT32_MAX:
            bad("top_k", "an int >= 0 (0 = off)")
        p = self.top_p
        if not _is_real(p) or not math.isfinite(p) or not 0 < p <= 1:
            bad("top_p", "a number in (0, 1] (1 = off)")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < UINT32):
            bad("seed", "None or an int in [0, 2**32)")
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT32_MAX:
            bad("max_tokens", "an int >= 1")
        ids = self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (tuple, list)):
            bad("stop_token_ids", "a tuple of token ids (ints >= 0)")
        if not all(_is_int(i) and 0 <= i <= INT32_MAX for i in ids):
            bad("stop_token_ids", "a tuple of token ids (ints >= 0)")
        if not isinstance(self.logprobs, (bool, np.bool_)):
            bad("logprobs", "a bool")
        object.__setattr__(self, "logprobs", bool(self.logprobs))
        # Normalize (frozen): plain Python numbers, a hashable tuple.
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "max_tokens", int(self.max_tokens))
        object.__setattr__(self, "seed", None if self.seed is None else int(self.seed))
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))

    def validate_for(self, vocab_size: int) -> None:
        """Raise RequestError unless top_k and every stop id fit a vocab of `vocab_size`."""
        if self.top_k > vocab_size:
            raise RequestError(
                f"SamplingParams.top_k must be <= the vocab size {vocab_size}, got {self.top_k}"
            )
        too_big = [i for i in self.stop_token_ids if i >= vocab_size]
        if too_big:
            raise RequestError(
                f"SamplingParams.stop_token_ids must be < the vocab size {vocab_size}, "
                f"got {too_big}"
            )


def finished(token: int, params: SamplingParams, num_generated: int) -> str | None:
    """Why a request ends after sampling `token`, its `num_generated`-th token, or None.

    "stop": `token` is a stop id (it wins over "length"); "length": max_tokens reached.
    """
    if token in params.stop_token_ids:
        return "stop"
    if num_generated >= params.max_tokens:
        return "length"
    return None


# ----- key streams ---------------------------------------------------------------------


def request_key(seed, stream=0) -> jax.Array:
    """Base key of a request: key(seed) with `stream` folded in (uint32 values; traceable)."""
    return jax.random.fold_in(jax.random.key(jnp.uint32(seed)), jnp.uint32(stream))


def step_key(key: jax.Array, position) -> jax.Array:
    """Key for the token sampled at sequence `position` (uint32) of a request."""
    return jax.random.fold_in(key, jnp.uint32(position))


def id_stream(request_id: str) -> int:
    """A stable uint32 from a request id (blake2b; Python's hash() is salted per process)."""
    digest = hashlib.blake2b(request_id.encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def request_seed(params: SamplingParams, request_id: str, engine_seed: int) -> tuple[int, int]:
    """(seed, stream) of a request: (params.seed, 0) if seeded, else (engine_seed, id hash).

    A seeded request's tokens depend only on its seed (and positions), not on its id.
    """
    if params.seed is not None:
        return params.seed, 0
    return engine_seed, id_stream(request_id)


@jax.jit
def row_keys(seeds: jax.Array, streams: jax.Array, positions: jax.Array) -> jax.Array:
    """Keys [B] of the rows: step_key(request_key(seeds[i], streams[i]), positions[i])."""
    return jax.vmap(lambda s, st, p: step_key(request_key(s, st), p))(seeds, streams, positions)


# ----- the jitted sampler --------------------------------------------------------------

GREEDY, TOP_K, TEMPERATURE, NUCLEUS, FULL_SORT = range(5)  # how a row is drawn (see module)


def _clean(logits: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)
    return jnp.where(logits == 0, 0.0, logits)  # -0.0 ranks like 0.0, as np.argmax sees it


def _sorted_probs(logits, temperature, top_k, top_p):
    """-> (order [B, V]: ids by descending logit, lowest id first on ties;
    probs [B, V] float32 in that order: softmax(logits / T) cut to top-k, then to the
    minimal nucleus reaching top_p, renormalized; one-hot on the argmax for T == 0)."""
    logits = _clean(logits)
    batch, vocab = logits.shape
    rank = jax.lax.broadcasted_iota(jnp.int32, (batch, vocab), 1)  # [B, V]
    neg, order = jax.lax.sort((-logits, rank), dimension=1, num_keys=1, is_stable=True)
    greedy = temperature <= 0  # [B]
    t = jnp.where(greedy, 1.0, temperature).astype(jnp.float32)[:, None]  # [B, 1]
    probs = jnp.exp((neg[:, :1] - neg) / t)  # [B, V]: (logit - max) / T <= 0, no overflow
    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)[:, None]  # [B, 1]
    probs = jnp.where(rank < k, probs, 0.0)
    probs = probs / jnp.sum(probs, axis=1, keepdims=True)
    cdf = jnp.cumsum(probs, axis=1)  # [B, V]
    before = jnp.pad(cdf[:, :-1], ((0, 0), (1, 0)))  # [B, V] mass of the higher ranks
    top_p = top_p.astype(jnp.float32)[:, None]  # [B, 1]
    keep = (rank == 0) | (before < top_p) | (top_p >= 1)
    probs = jnp.where(greedy[:, None], (rank == 0).astype(jnp.float32), probs * keep)
    return order, probs / jnp.sum(probs, axis=1, keepdims=True)


def _as_keys(keys: jax.Array) -> jax.Array:
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        return keys
    return jax.random.wrap_key_data(keys)  # raw uint32 [B, 2] (threefry)


def _uniforms(keys: jax.Array) -> jax.Array:
    """One uniform float32 [B] per row: every path draws by inverse CDF with it."""
    return jax.vmap(lambda key: jax.random.uniform(key, dtype=jnp.float32))(_as_keys(keys))


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, index[:, None], axis=1)[:, 0]  # x [B, N], index [B] -> [B]


def _first_above(cdf: jax.Array, x: jax.Array) -> jax.Array:
    """Column [B] where the non-decreasing `cdf` [B, N] first exceeds x [B] (>= 0), at most
    the column where it reaches its total: a column of zero weight is never chosen."""
    index = jnp.sum(cdf <= x[:, None], axis=1)
    return jnp.minimum(index, jnp.sum(cdf < cdf[:, -1:], axis=1)).astype(jnp.int32)


def _draw_sorted(logits, temperature, top_k, top_p, u):
    """FULL_SORT: inverse CDF over the stably sorted vocab -> (tokens, logprobs) [B]."""
    order, probs = _sorted_probs(logits, temperature, top_k, top_p)  # [B, V] each
    cdf = jnp.cumsum(probs, axis=1)  # [B, V]
    rank = jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=1)  # first rank with cdf > u * total
    rank = jnp.minimum(rank, jnp.sum(probs > 0, axis=1) - 1)  # kept tokens are a prefix
    return _take(order, rank).astype(jnp.int32), jnp.log(_take(probs, rank))


SORT_ROWS = 8  # FULL_SORT rows sorted at a time: its cost follows the rows that need it


def _draw_sorted_rows(logits, temperature, top_k, top_p, u, need):
    """FULL_SORT for the rows `need` [B] only, SORT_ROWS at a time (the others get 0)."""
    batch = logits.shape[0]
    rows = min(batch, SORT_ROWS)
    order = jnp.argsort(~need, stable=True)  # [B]: the rows that need it first

    def chunk(i, carry):
        start = jnp.minimum(i * rows, batch - rows)  # the last chunk may redo rows: same draw
        idx = jax.lax.dynamic_slice(order, (start,), (rows,))  # [R]
        drawn = _draw_sorted(logits[idx], temperature[idx], top_k[idx], top_p[idx], u[idx])
        return tuple(out.at[idx].set(new) for out, new in zip(carry, drawn))

    zeros = (jnp.zeros(batch, jnp.int32), jnp.zeros(batch, jnp.float32))
    return jax.lax.fori_loop(0, (jnp.sum(need) + rows - 1) // rows, chunk, zeros)


def _chunk_size(vocab: int) -> int:
    """A power of two near sqrt(vocab): the temperature path's two-level CDF."""
    return 1 << max(0, math.ceil(math.log2(max(vocab, 1)) / 2))


def _draw_temperature(logits, t, u):
    """TEMPERATURE: inverse CDF over the token ids in natural order, no sort, in two levels
    (chunk masses, then inside the chosen chunk) instead of a cumsum over V; the weights
    are never stored, only summed, and recomputed for the chosen chunk.
    -> (tokens, logprobs, z) [B]; z = sum(exp((logits - max) / t)), the softmax normalizer."""
    batch, vocab = logits.shape
    size = _chunk_size(vocab)
    chunks = -(-vocab // size)
    top = jnp.max(logits, axis=1)[:, None]  # [B, 1]
    scale = 1.0 / t[:, None]  # [B, 1]
    padded = jnp.pad(logits, ((0, 0), (0, chunks * size - vocab)), constant_values=-jnp.inf)
    padded = padded.reshape(batch, chunks, size)  # [B, n, C]
    mass = jnp.sum(jnp.exp((padded - top[:, :, None]) * scale[:, :, None]), axis=2)  # [B, n]
    chunk_cdf = jnp.cumsum(mass, axis=1)  # [B, n]
    z = chunk_cdf[:, -1]  # [B]
    x = u * z  # [B]
    chunk = _first_above(chunk_cdf, x)  # [B]
    before = jnp.where(chunk > 0, _take(chunk_cdf, jnp.maximum(chunk - 1, 0)), 0.0)  # [B]
    inner = jnp.take_along_axis(padded, chunk[:, None, None], axis=1)[:, 0]  # [B, C] logits
    scaled = (inner - top) * scale  # [B, C] <= 0
    index = _first_above(jnp.cumsum(jnp.exp(scaled), axis=1), x - before)  # [B]
    return chunk * size + index, _take(scaled, index) - jnp.log(z), z


def _draw_candidates(values, ids, keep_k, top_p, t, u, z, own_norm):
    """TOP_K and NUCLEUS: inverse CDF over the C best tokens `values`, `ids` [B, C]
    (descending, lower id first on ties), cut to the first keep_k [B], then to the minimal
    nucleus reaching top_p; the masses are over the kept candidates where own_norm [B],
    else over the whole vocab (normalizer z [B]).
    -> (tokens, logprobs, reached [B]: the candidates' mass reaches top_p)."""
    rank = jax.lax.broadcasted_iota(jnp.int32, values.shape, 1)  # [B, C]
    # max, not values[:, :1]: XLA CPU turns a TopK whose first column is sliced into a sort
    scaled = (values - jnp.max(values, axis=1, keepdims=True)) / t[:, None]  # [B, C] <= 0
    weights = jnp.where(rank < keep_k[:, None], jnp.exp(scaled), 0.0)  # [B, C]
    norm = jnp.where(own_norm, jnp.sum(weights, axis=1), z)  # [B]
    mass = jnp.cumsum(weights / norm[:, None], axis=1)  # [B, C]
    before = jnp.pad(mass[:, :-1], ((0, 0), (1, 0)))  # [B, C] mass of the higher ranks
    p = top_p[:, None]  # [B, 1]
    weights = weights * ((rank == 0) | (before < p) | (p >= 1))
    cdf = jnp.cumsum(weights, axis=1)  # [B, C]
    index = _first_above(cdf, u * cdf[:, -1])  # [B]
    logprobs = _take(scaled, index) - jnp.log(cdf[:, -1])
    return _take(ids, index).astype(jnp.int32), logprobs, mass[:, -1] >= top_p


def _sample_rows(logits, temperature, top_k, top_p, keys, max_top_k):
    """sample_rows, plus the path [B] each row took."""
    logits = logits.astype(jnp.float32)  # [B, V]; -0.0 is cleaned where it would rank
    batch, vocab = logits.shape
    size = min(max_top_k, vocab)  # C: candidates of the top-k path
    temperature = temperature.astype(jnp.float32)
    top_k = top_k.astype(jnp.int32)
    top_p = top_p.astype(jnp.float32)
    u = _uniforms(keys)  # [B]
    greedy = temperature <= 0
    t = jnp.where(greedy, 1.0, temperature)  # [B]
    k = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)  # [B], vocab = off
    path = jnp.select(
        [greedy, k <= size, (k == vocab) & (top_p >= 1), k == vocab],
        [GREEDY, TOP_K, TEMPERATURE, NUCLEUS],
        FULL_SORT,
    )  # [B]; a NUCLEUS row whose nucleus is wider than the candidates becomes FULL_SORT
    zeros_i, zeros_f = jnp.zeros(batch, jnp.int32), jnp.zeros(batch, jnp.float32)

    def skip(*extra):
        return lambda: (zeros_i, zeros_f, *extra)

    temp_tokens, temp_lp, z = jax.lax.cond(
        jnp.any((path == TEMPERATURE) | (path == NUCLEUS)),
        lambda: _draw_temperature(logits, t, u),
        skip(jnp.ones(batch, jnp.float32)),
    )

    def candidates():
        values, ids = jax.lax.top_k(_clean(logits), size)  # [B, C], lower id first on ties
        top = path == TOP_K
        return _draw_candidates(values, ids, jnp.where(top, k, size), top_p, t, u, z, top)

    cand_tokens, cand_lp, reached = jax.lax.cond(
        jnp.any((path == TOP_K) | (path == NUCLEUS)), candidates, skip(jnp.ones(batch, bool))
    )
    path = jnp.where((path == NUCLEUS) & ~reached, FULL_SORT, path)
    sort_tokens, sort_lp = _draw_sorted_rows(
        logits, temperature, top_k, top_p, u, path == FULL_SORT
    )  # no row needs it: no sort
    greedy_tokens = jax.lax.cond(
        jnp.any(greedy),
        lambda: jnp.argmax(logits, axis=1).astype(jnp.int32),  # lowest id on ties, -0.0 too
        lambda: zeros_i,
    )
    tokens = jnp.select(
        [path == GREEDY, path == TEMPERATURE, path == FULL_SORT],
        [greedy_tokens, temp_tokens, sort_tokens],
        cand_tokens,
    )
    logprobs = jnp.select(
        [path == GREEDY, path == TEMPERATURE, path == FULL_SORT],
        [zeros_f, temp_lp, sort_lp],
        cand_lp,
    )
    return tokens, logprobs, path


@functools.partial(jax.jit, static_argnames="max_top_k")
def sample_rows(logits, temperature, top_k, top_p, keys, *, max_top_k: int = 64):
    """(tokens int32 [B], logprobs float32 [B]): one token per row of `logits` [B, V].

    temperature [B] float32 (0 = greedy), top_k [B] int32 (0 = off), top_p [B] float32
    (1 = off), keys [B] PRNG keys (or raw uint32 [B, 2]); max_top_k (static): the
    candidates of the top-k path. Pure and jittable: call it inside a jitted step. Row i
    draws from `sampling_probs` with one uniform from keys[i] (see the module for the
    paths); logprobs[i] is the log-probability of the token under that final distribution
    (0 for greedy rows), not under the raw softmax.
    """
    if max_top_k < 1:
        raise ValueError(f"max_top_k must be >= 1, got {max_top_k}")
    tokens, logprobs, _ = _sample_rows(logits, temperature, top_k, top_p, keys, max_top_k)
    return tokens, logprobs


@jax.jit
def sample(logits, temperature, top_k, top_p, keys) -> jax.Array:
    """Token ids int32 [B]: `sample_rows` without the logprobs (default max_top_k)."""
    return sample_rows(logits, temperature, top_k, top_p, keys)[0]


@jax.jit
def sample_full_sort(logits, temperature, top_k, top_p, keys) -> jax.Array:
    """Token ids int32 [B] by the previous sampler: every row, greedy ones too, by inverse
    CDF over the stably sorted vocab. The reference for benchmarks/sampler.py."""
    return _draw_sorted(_clean(logits), temperature, top_k, top_p, _uniforms(keys))[0]


@jax.jit
def sampling_probs(logits, temperature, top_k, top_p) -> jax.Array:
    """The distribution `sample_rows` draws from: float32 [B, V] by token id (0 = never)."""
    order, probs = _sorted_probs(logits, temperature, top_k, top_p)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros(probs.shape, jnp.float32).at[rows, order].set(probs)


# ----- host side -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplerBatch:
    """Per-row sampler inputs (numpy), padded to a batch bucket with greedy rows.

    Row i samples the token at `positions[i]` of request `request_ids[i]`.
    """

    temperature: np.ndarray  # [Bp] float32, 0 on padding rows
    top_k: np.ndarray  # [Bp] int32
    top_p: np.ndarray  # [Bp] float32
    seeds: np.ndarray  # [Bp] uint32
    streams: np.ndarray  # [Bp] uint32
    positions: np.ndarray  # [Bp] uint32
    num_rows: int

    @classmethod
    def build(
        cls,
        params_list: Sequence[SamplingParams],
        positions: Sequence[int],
        request_ids: Sequence[str],
        *,
        vocab_size: int,
        engine_seed: int,
        batch_size: int | None = None,
    ) -> SamplerBatch:
        """Pack rows; `positions[i]`: sequence position of the token row i samples (prompt
        length + tokens generated before it); `batch_size`: the bucket (None: no padding)."""
        n = len(params_list)
        if len(positions) != n or len(request_ids) != n:
            raise RequestError(
                f"{n} params, {len(positions)} positions and {len(request_ids)} request ids"
            )
        padded = n if batch_size is None else batch_size
        if padded < n:
            raise RequestError(f"batch_size {batch_size} < {n} rows")
        if not _is_int(engine_seed) or not 0 <= engine_seed < UINT32:
            raise RequestError(f"engine_seed must be an int in [0, 2**32), got {engine_seed!r}")
        for pos in positions:
            if not _is_int(pos) or not 0 <= pos < UINT32:
                raise RequestError(f"positions must be ints in [0, 2**32), got {pos!r}")
        for params in params_list:
            params.validate_for(vocab_size)
        seeds = [request_seed(p, rid, engine_seed) for p, rid in zip(params_list, request_ids)]

        def column(values, fill, dtype):
            out = np.full(padded, fill, dtype)
            out[:n] = values
            return out

        return cls(
            temperature=column([p.temperature for p in params_list], 0.0, np.float32),
            top_k=column([p.top_k for p in params_list], 0, np.int32),
            top_p=column([p.top_p for p in params_list], 1.0, np.float32),
            seeds=column([s for s, _ in seeds], 0, np.uint32),
            streams=column([st for _, st in seeds], 0, np.uint32),
            positions=column(positions, 0, np.uint32),
            num_rows=n,
        )

    def keys(self) -> jax.Array:
        """PRNG keys [Bp] of the rows (one jitted call)."""
        return row_keys(self.seeds, self.streams, self.positions)

    def sample(self, logits) -> np.ndarray:
        """Token ids int32 [num_rows] from logits [num_rows or Bp, V] (zero-padded to Bp)."""
        padded = len(self.temperature)
        if logits.shape[0] < padded:
            logits = np.pad(np.asarray(logits), ((0, padded - logits.shape[0]), (0, 0)))
        tokens = sample(logits, self.temperature, self.top_k, self.top_p, self.keys())
        return np.asarray(tokens)[: self.num_rows]
