"""Sampling: per-request parameters, a jitted batched sampler, reproducible key streams.

A step's logits [B, V] (float32) become one token per row. Each row has its own
temperature, top-k, top-p and PRNG key, so greedy and sampled requests share one compiled
function; only the shapes (batch bucket, vocab) compile. A request's key at a position is
``step_key(request_key(seed, stream), position)``: its tokens depend on its seed and the
positions it samples at, not on the batch, the row, or a recompute after preemption.
"""

from __future__ import annotations

import dataclasses
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
    max_tokens: >= 1 tokens to generate; stop_token_ids: ids that end the request.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()

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


def _sorted_probs(logits, temperature, top_k, top_p):
    """-> (order [B, V]: ids by descending logit, lowest id first on ties;
    probs [B, V] float32 in that order: softmax(logits / T) cut to top-k, then to the
    minimal nucleus reaching top_p, renormalized; one-hot on the argmax for T == 0)."""
    logits = logits.astype(jnp.float32)
    logits = jnp.where(logits == 0, 0.0, logits)  # -0.0 sorts like 0.0, as np.argmax sees it
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


@jax.jit
def sample(logits, temperature, top_k, top_p, keys) -> jax.Array:
    """Token ids int32 [B], one per row of `logits` [B, V].

    temperature [B] float32 (0 = greedy), top_k [B] int32 (0 = off), top_p [B] float32
    (1 = off), keys [B] PRNG keys (or raw uint32 [B, 2]). Row i draws from
    `sampling_probs` with one uniform from keys[i], by inverse CDF over the sorted tokens.
    """
    order, probs = _sorted_probs(logits, temperature, top_k, top_p)  # [B, V] each
    u = jax.vmap(lambda key: jax.random.uniform(key, dtype=jnp.float32))(_as_keys(keys))  # [B]
    cdf = jnp.cumsum(probs, axis=1)  # [B, V]
    rank = jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=1)  # first rank with cdf > u * total
    rank = jnp.minimum(rank, jnp.sum(probs > 0, axis=1) - 1)  # kept tokens are a prefix
    return jnp.take_along_axis(order, rank[:, None], axis=1)[:, 0].astype(jnp.int32)


@jax.jit
def sampling_probs(logits, temperature, top_k, top_p) -> jax.Array:
    """The distribution `sample` draws from: float32 [B, V] by token id (0 = never)."""
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
