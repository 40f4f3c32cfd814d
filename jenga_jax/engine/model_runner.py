"""ModelRunner: one model, one shared pool, the host manager, and the jitted steps.

The runner allocates a step's rows in the manager, builds the padded page table with
numpy, moves it to the device once and runs the prefill or decode step, keeping the
returned (donated, updated in place) pool. Admission and batching policy belong to a
scheduler; a row the pool cannot hold now is refused and left out of the step.

The page plan is Jenga's or a baseline's ("paged": vLLM v0's PagedAttention, "uniform":
vLLM v1's hybrid manager; see docs/device.md), so that one KV budget can be served by
each allocator with the same model and the same steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from jenga_jax.core.errors import RequestError
from jenga_jax.core.kv_cache_manager import KVCacheManager
from jenga_jax.core.page_plan import make_plan, tpu_alignment
from jenga_jax.core.request import ImageInput
from jenga_jax.device.pool import PoolLayout
from jenga_jax.engine.buckets import Buckets
from jenga_jax.engine.page_table_builder import StepRow, build_page_table
from jenga_jax.engine.sampling import SamplerBatch
from jenga_jax.engine.steps import SamplerInputs, StepInputs, make_steps, sample_into
from pallas_kernels import choose_backend, parse_backend


@dataclasses.dataclass(frozen=True)
class Image:
    """An image given as embeddings [num_tokens, vision_dim] and a content hash (cache key)."""

    content_hash: str
    embeds: np.ndarray


@dataclasses.dataclass(frozen=True)
class Work:
    """A row of a step: compute `num_tokens` more tokens of a request.

    `new_token_ids` are tokens sampled since the last step (appended first). For a
    waiting request (first step, or after preemption) the tokens start after its
    prefix-cache hit, as found at allocation, and stop at its last known token.
    `num_unknown` (running requests): the last tokens are still being sampled on the
    device; the step takes them from there (asynchronous scheduling).
    """

    request_id: str
    num_tokens: int
    new_token_ids: tuple[int, ...] = ()
    num_unknown: int = 0


class ModelRunner:
    def __init__(
        self,
        model,
        *,
        allocator: str = "jenga",
        num_large_pages: int | None = None,
        kv_budget_bytes: int | None = None,
        tokens_per_page: int = 16,
        checkpoint_interval: int | None = None,
        buckets: Buckets | None = None,
        enable_prefix_caching: bool = True,
        debug: bool = False,
        pool_fill: float = 0.0,
        shuffle_seed: int | None = None,
        attention_backend: str | None = None,
        tokens_per_page_multiple: int | None = None,
    ):
        """`allocator`: the page plan, "jenga", "paged" or "uniform"; the pool is given
        as exactly one of `num_large_pages` or `kv_budget_bytes` (as many large pages as
        fit). `tokens_per_page`: jenga's target, or the baselines' base page;
        `pool_fill`: initial pool value (NaN in tests: unwritten pages must never be
        read); `shuffle_seed`: random page placement (tests); `attention_backend`:
        "reference", "triton" or "mosaic" (None: by platform, logged once), or
        "triton-interpret" / "mosaic-interpret" to run a kernel in interpret mode;
        `tokens_per_page_multiple` (jenga): every kind's tokens per page is a multiple
        of it (None: 1, or with the Mosaic kernel what keeps a page's rows whole TPU
        tiles; state pages are then rounded up to whole tiles too:
        ``page_plan.tpu_alignment``)."""
        cfg = model.cfg
        self.cfg = cfg
        self.allocator = allocator
        layout = cfg.layout(cfg.dtype, checkpoint_interval)
        if (num_large_pages is None) == (kv_budget_bytes is None):
            raise ValueError(
                "give the pool size as exactly one of num_large_pages, kv_budget_bytes"
            )
        backend = choose_backend(parse_backend(attention_backend)[0])[0]
        if allocator == "jenga":
            # Mosaic (TPU): pages in whole tiles, so that every view is a bitcast.
            align = tpu_alignment(layout) if backend == "mosaic" else {}
            if tokens_per_page_multiple is not None:
                align["tokens_per_page_multiple"] = tokens_per_page_multiple
            self.plan = make_plan(layout, "jenga", tokens_per_page, **align)
        else:
            if tokens_per_page_multiple is not None:
                raise ValueError("tokens_per_page_multiple is for the jenga plan")
            self.plan = make_plan(layout, allocator, tokens_per_page)
        if self.plan.images_inline and backend != "reference":
            raise ValueError(
                f"the {allocator!r} plan stores images inline in the token stream, which "
                f"only the reference attention reads (key offsets), not the {backend} kernel"
            )
        if kv_budget_bytes is not None:
            num_large_pages = kv_budget_bytes // self.plan.large_page_bytes
            if num_large_pages < 1:
                raise ValueError(
                    f"a KV budget of {kv_budget_bytes:,} B is smaller than one large page "
                    f"({self.plan.large_page_bytes:,} B) of the {allocator!r} plan"
                )
        self.manager = KVCacheManager(
            layout,
            num_large_pages * self.plan.large_page_bytes,
            plan=self.plan,
            enable_prefix_caching=enable_prefix_caching,
            shuffle_seed=shuffle_seed,
        )
        state_dims = (cfg.d_inner, cfg.mamba.d_state, cfg.mamba.d_conv) if cfg.mamba else None
        self.layout = PoolLayout.from_plan(self.plan, num_large_pages, state_dims=state_dims)
        self.pool = self.layout.full(pool_fill)
        self.steps = make_steps(
            model, self.layout, debug=debug, attention_backend=attention_backend
        )
        self.params = self.steps.params
        self.buckets = buckets or Buckets()
        self._images: dict[str, list[Image]] = {}  # per request (the tokens: the manager)
        self.sampled: jax.Array | None = None  # int32 [token_slots]: the last sampled tokens

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        *,
        images: Sequence[Image] = (),
        max_new_tokens: int = 0,
        prefill_chunk: int | None = None,
        salt: str | None = None,
    ) -> str:
        """Register a request; checks the model's limits before the manager sees it.
        `salt`: its prefix-cache pages are shared only with requests of the same salt."""
        cfg = self.cfg
        prompt = [int(t) for t in prompt_token_ids]
        total = len(prompt) + max_new_tokens
        if total > cfg.max_seq_len:
            raise RequestError(
                f"request {request_id!r}: {len(prompt)} prompt + {max_new_tokens} new tokens "
                f"exceed the model's maximum length {cfg.max_seq_len}"
            )
        if any(not 0 <= t < cfg.num_embeddings for t in prompt):  # extra rows: e.g. <|image|>
            raise RequestError(
                f"request {request_id!r}: token ids must be in [0, {cfg.num_embeddings})"
            )
        images = list(images)
        if images and cfg.vision_dim is None:
            raise RequestError(f"{cfg.name} has no cross-attention layers: it takes no images")
        for im in images:
            e = np.asarray(im.embeds)
            if e.ndim != 2 or e.shape[0] < 1 or e.shape[1] != cfg.vision_dim:
                raise RequestError(
                    f"request {request_id!r}: image {im.content_hash!r} embeddings must be "
                    f"[num_tokens >= 1, {cfg.vision_dim}], got {list(e.shape)}"
                )
        if images and cfg.image_token_id is not None:  # mllama: the layout it computes exactly
            marks = [i for i, t in enumerate(prompt) if t == cfg.image_token_id]
            if len(images) != 1 or marks != [0]:
                raise RequestError(
                    f"request {request_id!r}: {cfg.name} takes one image per request, with "
                    f"its image token {cfg.image_token_id} first in the prompt and nowhere "
                    f"else; got {len(images)} images, image tokens at {marks[:8]}"
                )
        host_images = [ImageInput(im.content_hash, len(im.embeds)) for im in images]
        rid = self.manager.add_request(
            request_id,
            prompt,
            images=host_images,
            max_new_tokens=max_new_tokens,
            prefill_chunk=prefill_chunk,
            salt=salt,
        )
        self._images[rid] = images
        return rid

    def free(self, request_id: str) -> None:
        self.manager.free(request_id)
        del self._images[request_id]

    def preempt(self, request_id: str) -> None:
        """Give back a running request's pages; its next step recomputes (cache hits help)."""
        self.manager.preempt(request_id)

    # ------------------------------------------------------------------ steps
    def step(self, work: Sequence[Work], *, decode: bool = False, all_logits: bool = False):
        """Allocate and run one step.

        Returns (rows, logits, refused). A row the pool cannot hold now is refused: it
        changes nothing (its new_token_ids are not kept; send them again) and the step
        runs without it. logits: float32 numpy [len(rows), vocab], or per row
        [num_tokens, vocab] with all_logits (prefill only). No row at all: (.., None, ..).
        """
        rows, refused = self.allocate(work)
        if not rows:
            return rows, None, refused
        prepared = self.prepare(rows, decode=decode, all_logits=all_logits)
        return rows, self.execute(prepared), refused

    def allocate(self, work: Sequence[Work]) -> tuple[list[StepRow], list[tuple[Work, str]]]:
        """Pages for every row that fits now; (rows, refused with reasons). All the work
        is validated first, so a bad row raises before any row is allocated."""
        for w in work:
            if w.request_id not in self._images:
                raise RequestError(f"unknown request {w.request_id!r}")
            for t in w.new_token_ids:
                if not 0 <= t < self.cfg.vocab_size:
                    raise RequestError(f"token id {t} out of [0, {self.cfg.vocab_size})")
            known = self.manager.num_tokens(w.request_id) + len(w.new_token_ids) + w.num_unknown
            if known > self.cfg.max_seq_len:
                raise RequestError(
                    f"request {w.request_id!r} would exceed the model's maximum length "
                    f"{self.cfg.max_seq_len}"
                )
        rows, refused = [], []
        for w in work:
            n = w.num_tokens
            if not self.manager.is_running(w.request_id):  # tokens follow the hit, up to known
                hit = self.manager.lookup(w.request_id)
                n = min(n, self.manager.num_tokens(w.request_id) + len(w.new_token_ids) - hit)
            result = self.manager.allocate(
                w.request_id, n, list(w.new_token_ids), num_unknown=w.num_unknown
            )
            if not result:
                refused.append((w, result.reason))
                continue
            end = self.manager.num_computed_tokens(w.request_id)
            rows.append(StepRow(w.request_id, end - n, n))
        return rows, refused

    def prepare(
        self,
        rows: Sequence[StepRow],
        *,
        decode: bool,
        all_logits: bool = False,
        sampler: SamplerBatch | None = None,
        feed: Sequence[int] | None = None,
    ):
        """The step function and its device inputs for allocated rows (nothing runs).

        With `sampler` (one row per step row, padded to the step's batch bucket) the
        step's logits are sampled on the device: run it with :meth:`dispatch`. feed
        (sampling steps): per row, the slot of the token buffer (:meth:`dispatch`)
        holding its last token, one whose id the host does not know yet, or -1."""
        if decode and all_logits:
            raise ValueError("all_logits is for prefill steps")
        if sampler is not None and all_logits:
            raise ValueError("a sampling step samples each row's last token: no all_logits")
        table, enc, image_rows = build_page_table(
            self.manager,
            self.layout,
            rows,
            self.buckets,
            decode=decode,
            max_seq_len=self.cfg.max_seq_len,
        )
        b, q = table.q_positions.shape
        token_ids = np.zeros((b, q), np.int32)
        feed_slots = np.full(b, -1, np.int32)
        if feed is not None:
            if sampler is None or len(feed) != len(rows):
                raise ValueError(f"feed needs a sampler and one slot per row ({len(rows)})")
            feed_slots[: len(rows)] = feed
        for i, r in enumerate(rows):
            ids = self.manager.token_ids(r.request_id, r.start, r.start + r.num_tokens)
            fed = 1 if feed_slots[i] >= 0 else 0
            if len(ids) != r.num_tokens - fed:
                raise ValueError(
                    f"request {r.request_id!r}: {r.num_tokens - len(ids)} of its step's "
                    f"{r.num_tokens} tokens are unknown and {fed} fed from the device "
                    "(only the last token of a row may be, and must be when unknown)"
                )
            token_ids[i, : len(ids)] = ids
        image_embeds = None
        if image_rows:  # rows that write some image K/V this step get all their images
            image_embeds = np.zeros((b, enc, self.cfg.vision_dim), self.cfg.dtype)
            for i in image_rows:
                ims = self._images[rows[i].request_id]
                flat = np.concatenate([np.asarray(im.embeds) for im in ims])
                image_embeds[i, : len(flat)] = flat
        inputs = StepInputs(token_ids, image_embeds)
        if sampler is not None:
            inputs = StepInputs(token_ids, image_embeds, feed_slots)
            if len(sampler.temperature) != b or sampler.num_rows != len(rows):
                raise ValueError(
                    f"the sampler has {sampler.num_rows} rows padded to "
                    f"{len(sampler.temperature)}; the step has {len(rows)} padded to {b}"
                )
            table, inputs, sampling = jax.device_put(
                (table, inputs, SamplerInputs.from_batch(sampler))
            )
            fn = self.steps.decode if decode else self.steps.prefill
            return PreparedStep(fn, table, inputs, tuple(rows), False, sampling)
        if decode:
            fn = self.steps.decode
        else:
            fn = self.steps.prefill_all if all_logits else self.steps.prefill
        table, inputs = jax.device_put((table, inputs))
        return PreparedStep(fn, table, inputs, tuple(rows), all_logits)

    @property
    def token_slots(self) -> int:
        """Size of the sampled-token buffer: the largest batch bucket twice (a step's
        decode rows write from slot 0, its prefill rows from the largest bucket)."""
        if self.buckets.batch is None:
            raise ValueError("sampling steps need explicit batch buckets (Buckets.batch)")
        return 2 * self.buckets.batch[-1]

    def dispatch(self, prepared: PreparedStep, slot_offset: int = 0):
        """Start a prepared sampling step (asynchronously); keeps the updated pool.
        Returns the rows' next tokens and their logprobs on the device, int32 and float32
        [padded batch]; the tokens are also kept on the device, in the token buffer from
        `slot_offset`, where the next step's rows may take them (``prepare(...,
        feed=)``)."""
        if prepared.sampler is None:
            raise ValueError("dispatch runs sampling steps: prepare(..., sampler=...)")
        slots = self.token_slots
        if self.sampled is None or self.sampled.shape != (slots,):
            self.sampled = jax.device_put(np.zeros(slots, np.int32))
        b = len(prepared.sampler.temperature)
        if not 0 <= slot_offset <= slots - b:
            raise ValueError(f"slot_offset {slot_offset} leaves no room for {b} rows of {slots}")
        inputs = prepared.inputs.replace(sampled=self.sampled)
        logits, self.pool = prepared.fn(self.params, self.pool, prepared.table, inputs)
        tokens, logprobs, self.sampled = sample_into(  # logits stay on the device
            logits, prepared.sampler, self.sampled, np.int32(slot_offset)
        )
        return tokens, logprobs

    def fetch_tokens(self, pending: Sequence[jax.Array], counts: Sequence[int]) -> np.ndarray:
        """Wait for dispatched steps; the first counts[i] entries of each of their
        per-row arrays (tokens or logprobs), concatenated."""
        fetched = jax.device_get(list(pending))
        return np.concatenate([t[:n] for t, n in zip(fetched, counts)])

    def execute(self, prepared: PreparedStep):
        """Run a prepared step; keeps the updated pool. Returns the rows' logits (numpy)."""
        if prepared.sampler is not None:
            raise ValueError("a sampling step returns tokens: run it with dispatch")
        logits, self.pool = prepared.fn(self.params, self.pool, prepared.table, prepared.inputs)
        rows = prepared.rows
        logits = np.asarray(logits)[: len(rows)]
        if prepared.all_logits:
            return [logits[i, : r.num_tokens] for i, r in enumerate(rows)]
        return logits


@dataclasses.dataclass(frozen=True)
class PreparedStep:
    """A step ready to run: fn(params, pool, table, inputs) -> (logits, pool); with
    `sampler`, the logits are sampled on the device (:meth:`ModelRunner.dispatch`)."""

    fn: object
    table: object
    inputs: StepInputs
    rows: tuple[StepRow, ...]
    all_logits: bool
    sampler: SamplerInputs | None = None
