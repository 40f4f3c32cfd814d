"""The engine: requests in, tokens out, over one model and one shared paged pool.

``add_request`` validates and queues; ``step`` schedules (``Scheduler``), dispatches
the decode rows and the prefill chunks as two jitted steps over the same pool, samples
their logits on the device, fetches one token id per row (never logits), keeps the tokens
of the rows that reached the end of their known tokens, and finishes requests on a stop
token or at ``max_tokens``. With asynchronous scheduling (the default) it dispatches step
N+1 before fetching step N's tokens: the host schedules and builds while the device runs,
and the rows of step N+1 that continue a request take step N's token on the device.
``generate`` and ``stream`` drive ``step`` for you; ``abort`` frees a request's pages
at once. Given a ``Tokenizer``, prompts may be text, outputs carry ``text``, requests
stop on its end-of-sequence ids, and ``stream_text`` yields text.
A request's ``cache_salt`` keeps its prefix-cache pages apart from those of requests
with another salt (tenants); ``SamplingParams.logprobs`` keeps the sampled tokens'
log-probabilities.

Everything but the model steps and the sampler is host Python; the device sees one
page table per jitted step. With a fixed seed a request's tokens do not depend on batching,
chunking or preemption (sampling keys are per request and position).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator, Sequence

import numpy as np

from jenga_jax.core.errors import RequestError
from jenga_jax.core.layer_kinds import AttentionType
from jenga_jax.engine import warmup
from jenga_jax.engine.buckets import Buckets, width_levels
from jenga_jax.engine.compile_cache import enable_compilation_cache
from jenga_jax.engine.engine_request import EngineRequest, RequestOutput, Status
from jenga_jax.engine.model_runner import Image, ModelRunner
from jenga_jax.engine.sampling import UINT32, SamplerBatch, SamplingParams, finished
from jenga_jax.engine.scheduler import Scheduler, SchedulerConfig
from jenga_jax.engine.text import TextStream, Tokenizer


@dataclasses.dataclass
class EngineCounters:
    """Totals since the engine started (host-side, cheap)."""

    steps: int = 0
    rows: int = 0  # request rows over all steps (sum of batch sizes)
    generated_tokens: int = 0
    finished_requests: int = 0
    prompt_tokens: int = 0  # of the requests added

    @property
    def mean_batch_size(self) -> float:
        return self.rows / self.steps if self.steps else 0.0


class Engine:
    """A continuous-batching engine over a :class:`ModelRunner`.

    model: a ``models.HybridDecoder`` (or anything with its interface); exactly one of
    num_large_pages / kv_budget_bytes sizes the pool; allocator: "jenga", "paged" or
    "uniform" (the baselines, for comparison); max_model_len: the longest request
    (prompt + max_tokens) accepted, at most the model's; it sets the widest block table
    (see block_table_levels and :meth:`warmup`); max_encoder_tokens:
    most image tokens per request (models with cross attention); checkpoint_interval:
    state (Mamba) kinds keep a state every this many tokens, so prefixes can hit (None:
    never; prefill chunks then end on checkpoints). tokenizer: a ``Tokenizer`` (text
    prompts and outputs), or None (token ids only). compilation_cache_dir: JAX's
    persistent compilation cache, so that a second start loads its compiled steps (None:
    ``$JENGA_JAX_CACHE_DIR`` or ``~/.cache/jenga-jax/xla``; "off": no cache; see
    ``engine.compile_cache``). block_table_levels: how many block-table widths a step
    may take (each half the last, the widest holding max_model_len; see
    ``buckets.width_levels``): a step's attention reads the level of its longest row,
    so its cost follows the tokens in use; each level adds step shapes to compile (2 by
    default: start-up stays near the single-width engine's, short contexts read half).
    async_scheduling: schedule and build step N+1 while step N runs on the device; its
    decode rows take step N's sampled tokens on the device. ``step`` then returns the
    tokens of the step before the one it dispatched (stop checks, aborts and
    preemption stay exact: a request that finished at step N gets nothing from N+1).
    Tokens are the same either way.
    """

    def __init__(
        self,
        model,
        *,
        num_large_pages: int | None = None,
        kv_budget_bytes: int | None = None,
        allocator: str = "jenga",
        scheduler: SchedulerConfig | None = None,
        max_model_len: int | None = None,
        max_encoder_tokens: int | None = None,
        tokens_per_page: int = 16,
        checkpoint_interval: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        attention_backend: str | None = None,
        debug: bool = False,
        pool_fill: float = 0.0,
        shuffle_seed: int | None = None,
        tokenizer: Tokenizer | None = None,
        compilation_cache_dir: str | None = None,
        block_table_levels: int = 2,
        async_scheduling: bool = True,
    ):
        cfg = model.cfg
        self.compilation_cache_dir = enable_compilation_cache(compilation_cache_dir)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.config = scheduler or SchedulerConfig()
        if not isinstance(seed, int) or not 0 <= seed < UINT32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        self.seed = seed
        self.max_model_len = max_model_len or cfg.max_seq_len
        if not 1 <= self.max_model_len <= cfg.max_seq_len:
            raise ValueError(
                f"max_model_len must be in [1, {cfg.max_seq_len}] ({cfg.name}), got {max_model_len}"
            )
        self.max_encoder_tokens = 0
        if cfg.vision_dim is not None:
            self.max_encoder_tokens = max_encoder_tokens or self.max_model_len
        self.runner = ModelRunner(
            model,
            num_large_pages=num_large_pages,
            kv_budget_bytes=kv_budget_bytes,
            allocator=allocator,
            tokens_per_page=tokens_per_page,
            checkpoint_interval=checkpoint_interval,
            enable_prefix_caching=enable_prefix_caching,
            debug=debug,
            pool_fill=pool_fill,
            shuffle_seed=shuffle_seed,
            attention_backend=attention_backend,
        )
        self.kind_pages = self._kind_pages(self.runner.plan)
        token_tpp = [k.tokens_per_page if k.is_token_kind else None for k in self.runner.plan.kinds]
        self.runner.buckets = Buckets(
            batch=_pow2_up_to(self.config.max_num_seqs),
            queries=_pow2_up_to(self.config.prefill_chunk, lo=min(16, self.config.prefill_chunk)),
            kind_pages=self.kind_pages,  # the widest block tables
            kind_levels=width_levels(self.kind_pages, token_tpp, block_table_levels),
            encoder=(self.max_encoder_tokens,) if self.max_encoder_tokens else None,
        )  # a few step shapes (see warmup)
        self.manager = self.runner.manager
        self.scheduler = Scheduler(self.runner, self.config)
        self.counters = EngineCounters()
        self.async_scheduling = async_scheduling
        self._in_flight: _Dispatched | None = None  # the step on the device (async)
        self._requests: dict[str, EngineRequest] = {}  # unfinished ones
        self._arrivals = itertools.count()
        self._auto_ids = itertools.count()

    _IMAGE_PAGE_SLACK = 3  # cross kinds: room for 4 images' partial last pages

    def _kind_pages(self, plan) -> tuple[int, ...]:
        """Block-table width of each kind: enough for any accepted request."""
        stream = self.max_model_len + (self.max_encoder_tokens if plan.images_inline else 0)
        widths = []
        for k in plan.kinds:
            if k.type is AttentionType.CROSS:
                tpp = k.tokens_per_page
                widths.append(-(-self.max_encoder_tokens // tpp) + self._IMAGE_PAGE_SLACK)
            elif k.is_token_kind:
                widths.append(-(-stream // k.tokens_per_page))
            else:
                widths.append(0)  # state kinds have no block table
        return tuple(widths)

    def _check_image_pages(self, request_id: str, images: Sequence[Image]) -> None:
        for k, width in zip(self.runner.plan.kinds, self.kind_pages):
            if k.type is AttentionType.CROSS:
                pages = sum(-(-len(im.embeds) // k.tokens_per_page) for im in images)
                if pages > width:
                    raise RequestError(
                        f"request {request_id!r}: its {len(images)} images take {pages} pages "
                        f"of {k.tokens_per_page} tokens; at most {width} fit a block table "
                        "(fewer, larger images, or raise max_encoder_tokens)"
                    )

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt_token_ids: Sequence[int] | str,
        sampling_params: SamplingParams | None = None,
        images: Sequence[Image] | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> str:
        """Queue a request; returns its id. The prompt is token ids, or text when the
        engine has a tokenizer. cache_salt: requests share prefix-cache pages only with
        requests of the same salt (None: the unsalted pool). Raises RequestError
        (nothing queued) when the prompt, the parameters or the images are invalid, or
        when the request could never fit in the pool."""
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise RequestError(
                f"sampling_params must be SamplingParams, got {type(params).__name__}"
            )
        params.validate_for(self.cfg.vocab_size)
        if request_id is None:
            request_id = f"req-{next(self._auto_ids)}"
            while request_id in self._requests:
                request_id = f"req-{next(self._auto_ids)}"
        if not isinstance(request_id, str) or not request_id:
            raise RequestError(f"request_id must be a non-empty str, got {request_id!r}")
        if request_id in self._requests:
            raise RequestError(f"request {request_id!r} already exists")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise RequestError(f"cache_salt must be None or a non-empty str, got {cache_salt!r}")
        if isinstance(prompt_token_ids, str):
            prompt_token_ids = self._encode(request_id, prompt_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_ids:
            stops = params.stop_token_ids + tuple(
                t for t in self.tokenizer.eos_token_ids if t not in params.stop_token_ids
            )
            params = dataclasses.replace(params, stop_token_ids=stops)
            params.validate_for(self.cfg.vocab_size)
        prompt = _token_ids(request_id, prompt_token_ids, self.cfg.num_embeddings)
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"request {request_id!r}: {len(prompt)} prompt + {params.max_tokens} max_tokens "
                f"exceed max_model_len {self.max_model_len}"
            )
        images = _images(request_id, images, self.cfg, self.max_encoder_tokens)
        self._check_image_pages(request_id, images)
        self.runner.add_request(
            request_id,
            prompt,
            images=images,
            max_new_tokens=params.max_tokens,
            prefill_chunk=self.config.prefill_chunk,
            salt=cache_salt,
        )
        req = EngineRequest(
            request_id,
            tuple(prompt),
            params,
            arrival_index=next(self._arrivals),
            arrival_time=time.perf_counter(),
        )
        self._requests[request_id] = req
        self.scheduler.add(req)
        self.counters.prompt_tokens += len(prompt)
        return request_id

    def _encode(self, request_id: str, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError(
                f"request {request_id!r}: a text prompt needs a tokenizer (Engine(tokenizer=...)); "
                "this engine takes token ids"
            )
        return self.tokenizer.encode(text)

    def _output(self, req: EngineRequest, new_token_ids: tuple[int, ...] = ()) -> RequestOutput:
        out = req.output(new_token_ids)
        if self.tokenizer is None or not out.finished:  # decoded once, at the end
            return out
        return dataclasses.replace(out, text=self.tokenizer.decode(out.output_token_ids))

    def abort(self, request_id: str) -> RequestOutput:
        """Stop a waiting or running request now and free its pages."""
        req = self._requests.get(request_id)
        if req is None:
            raise RequestError(f"unknown request {request_id!r} (never added, or already finished)")
        self._finish(req, "abort")
        return self._output(req)

    def warmup(self, progress=None) -> int:
        """Compile every step shape now (see ``engine.warmup``); returns how many.
        progress(done, total) is called after each shape."""
        return warmup.warmup(self, progress)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def _finish(self, req: EngineRequest, reason: str) -> None:
        self.scheduler.remove(req)
        self.runner.free(req.request_id)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = time.perf_counter()
        del self._requests[req.request_id]
        self.counters.finished_requests += 1

    # ------------------------------------------------------------------ steps
    def step(self) -> list[RequestOutput]:
        """Run one step. Returns an output for every request that got a token (with
        `finished` set for those that ended); empty when there was nothing to run.

        With async_scheduling the step is dispatched, then the previous step's tokens
        are fetched and given out while this one runs on the device: the outputs are
        the previous step's (see the class docstring)."""
        plan = self.scheduler.schedule()
        dispatched = self._dispatch(plan) if plan.num_rows else None
        previous, self._in_flight = self._in_flight, dispatched
        outputs = self._collect(previous) if previous is not None else []
        if not self.async_scheduling and self._in_flight is not None:
            dispatched, self._in_flight = self._in_flight, None
            outputs += self._collect(dispatched)
        return outputs

    def _dispatch(self, plan) -> _Dispatched:
        """Start a scheduled step: decode rows and prefill chunks as two jitted steps,
        both dispatched before anything waits. A row whose last token is still being
        sampled by the step in flight takes it on the device (its buffer slot)."""
        previous = self._in_flight
        reqs, samples, slots, pending, pending_logprobs, counts = [], [], {}, [], [], []
        for batch, decode in ((plan.decode, True), (plan.prefill, False)):
            if not batch:
                continue
            offset = 0 if decode else self.runner.token_slots // 2
            feed, sampling = [], []
            for i, r in enumerate(batch):
                req = self._requests[r.request_id]
                unknown = self.manager.num_unknown_tokens(r.request_id)
                if unknown:  # allocated while in flight: previous sampled it
                    if previous is None or previous.slots.get(r.request_id, (None,))[0] is not req:
                        raise RuntimeError(f"request {r.request_id!r} has no token in flight")
                    feed.append(previous.slots[r.request_id][1])
                else:
                    feed.append(-1)
                end = r.start + r.num_tokens  # samples once it reaches its last token
                sampling.append(end == self.manager.num_tokens(r.request_id) + unknown)
                if sampling[-1]:
                    slots[r.request_id] = (req, offset + i)
                    req.in_flight += 1
                reqs.append(req)
            sampler = self._sampler_batch(batch, sampling)
            prepared = self.runner.prepare(batch, decode=decode, sampler=sampler, feed=feed)
            tokens, logprobs = self.runner.dispatch(prepared, offset)
            pending.append(tokens)
            pending_logprobs.append(logprobs)
            counts.append(len(batch))
            samples += sampling
        self.counters.steps += 1
        self.counters.rows += len(reqs)
        return _Dispatched(tuple(reqs), tuple(samples), slots, pending, counts, pending_logprobs)

    def _collect(self, step: _Dispatched) -> list[RequestOutput]:
        """Fetch a dispatched step's tokens (int32, one per row) and give them out: to
        the outputs, to the manager, through the stop checks. A request finished or
        aborted since the step was dispatched gets nothing more."""
        tokens = self.runner.fetch_tokens(step.pending, step.counts)  # int32 [rows]
        logprobs = [None] * len(tokens)
        if any(r.params.logprobs for r in step.reqs):  # fetched only when asked for
            logprobs = self.runner.fetch_tokens(step.logprobs, step.counts).tolist()
        c = self.counters
        outputs = []
        now = time.perf_counter()
        for req, samples, token, logprob in zip(step.reqs, step.samples, tokens.tolist(), logprobs):
            if not samples:
                continue  # a prefill chunk short of the prompt's end: no token yet
            req.in_flight -= 1
            if req.status is Status.FINISHED:
                continue
            rid = req.request_id
            if self.manager.num_unknown_tokens(rid) or req.status is Status.WAITING:
                self.manager.append_tokens(rid, [token])  # its slot, or a preempted one
            else:
                req.pending.append(token)  # the next allocation appends it
            req.output_token_ids.append(token)
            if req.params.logprobs:
                req.output_logprobs.append(logprob)
            if req.first_token_time is None:
                req.first_token_time = now
            c.generated_tokens += 1
            reason = finished(token, req.params, len(req.output_token_ids))
            if reason:
                self._finish(req, reason)
            outputs.append(self._output(req, (token,)))
        return outputs

    def _sampler_batch(self, rows, sampling: Sequence[bool]) -> SamplerBatch:
        """Sampling inputs of a step's rows, padded to its batch bucket. A row samples
        the token after its last one when it reaches the end of its known tokens
        (`sampling`); the others (prefill chunks mid-prompt) get greedy parameters, and
        their token is dropped."""
        params, positions = [], []
        for r, samples in zip(rows, sampling):
            end = r.start + r.num_tokens
            params.append(self._requests[r.request_id].params if samples else _NO_SAMPLE)
            positions.append(end if samples else 0)
        return SamplerBatch.build(
            params,
            positions,
            [r.request_id for r in rows],
            vocab_size=self.cfg.vocab_size,
            engine_seed=self.seed,
            batch_size=self.runner.buckets.batch_size(len(rows)),
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int] | str],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        images: Sequence[Sequence[Image] | None] | None = None,
    ) -> list[RequestOutput]:
        """Run a batch of prompts to completion; outputs in prompt order. Other queued
        requests advance too. If one request is invalid, none is queued."""
        n = len(prompts)
        params = sampling_params
        if params is None or isinstance(params, SamplingParams):
            params = [params] * n
        images = [None] * n if images is None else list(images)
        if len(params) != n or len(images) != n:
            raise RequestError(
                f"{n} prompts but {len(params)} sampling params and {len(images)} image lists"
            )
        ids = []
        try:
            for prompt, p, ims in zip(prompts, params, images):
                ids.append(self.add_request(prompt, p, ims))
        except RequestError:
            for rid in ids:
                self.abort(rid)
            raise
        reqs = [self._requests[rid] for rid in ids]
        while any(r.status is not Status.FINISHED for r in reqs):
            self.step()
        return [self._output(r) for r in reqs]

    def stream(
        self,
        prompt_token_ids: Sequence[int] | str,
        sampling_params: SamplingParams | None = None,
        images: Sequence[Image] | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> Iterator[int]:
        """Yield the request's tokens as they are sampled (stepping the engine; other
        requests advance too). Closing the generator early aborts the request."""
        rid = self.add_request(prompt_token_ids, sampling_params, images, request_id, cache_salt)
        req = self._requests[rid]
        sent = 0
        try:
            while req.status is not Status.FINISHED:
                self.step()
                while sent < len(req.output_token_ids):
                    sent += 1
                    yield req.output_token_ids[sent - 1]
        finally:
            if req.status is not Status.FINISHED:
                self.abort(rid)

    def stream_text(
        self,
        prompt: str,
        sampling_params: SamplingParams | None = None,
        images: Sequence[Image] | None = None,
        request_id: str | None = None,
    ) -> Iterator[str]:
        """Yield the reply's text as it grows (needs a tokenizer). A piece is held back
        while it ends in an incomplete character. Closing early aborts the request."""
        if self.tokenizer is None:
            raise RequestError("stream_text needs a tokenizer (Engine(tokenizer=...))")
        text = TextStream(self.tokenizer)
        for token in self.stream(prompt, sampling_params, images, request_id):
            if piece := text.push(token):
                yield piece
        if piece := text.flush():  # a last incomplete character
            yield piece


_NO_SAMPLE = SamplingParams(temperature=0.0)  # rows whose token is dropped


@dataclasses.dataclass(frozen=True)
class _Dispatched:
    """A step on the device: each row's request and whether it samples a kept token;
    slots: request id -> (request, buffer slot of its token) for the sampling rows;
    pending: the tokens of its jitted steps (int32 [padded batch]), counts[i] real;
    logprobs: the sampled tokens' logprobs, fetched only for a request asking for them."""

    reqs: tuple[EngineRequest, ...]
    samples: tuple[bool, ...]
    slots: dict
    pending: list
    counts: list[int]
    logprobs: list  # float32 [padded batch] per jitted step, beside `pending`


def _pow2_up_to(n: int, lo: int = 1) -> tuple[int, ...]:
    """lo, 2 lo, 4 lo, ... and n itself as the last size."""
    sizes = []
    s = lo
    while s < n:
        sizes.append(s)
        s *= 2
    return (*sizes, n)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _token_ids(request_id: str, prompt, vocab_size: int) -> list[int]:
    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__"):
        raise RequestError(f"request {request_id!r}: prompt_token_ids must be a sequence of ints")
    ids = list(prompt)
    if not ids:
        raise RequestError(f"request {request_id!r}: the prompt is empty")
    bad = [t for t in ids if not _is_int(t) or not 0 <= t < vocab_size]
    if bad:
        raise RequestError(
            f"request {request_id!r}: token ids must be ints in [0, {vocab_size}), got {bad[:5]}"
        )
    return [int(t) for t in ids]


def _images(request_id: str, images, cfg, max_encoder_tokens: int) -> list[Image]:
    images = [] if images is None else list(images)
    if images and cfg.vision_dim is None:
        raise RequestError(f"{cfg.name} has no cross-attention layers: it takes no images")
    for im in images:
        if not isinstance(im, Image):
            raise RequestError(f"request {request_id!r}: images must be Image, got {im!r}")
        e = np.asarray(im.embeds)
        if e.ndim != 2 or e.shape[0] < 1 or e.shape[1] != cfg.vision_dim:
            raise RequestError(
                f"request {request_id!r}: image {im.content_hash!r} embeddings must be "
                f"[num_tokens >= 1, {cfg.vision_dim}], got {list(e.shape)}"
            )
        if not np.issubdtype(e.dtype, np.floating) or not np.isfinite(e).all():
            raise RequestError(
                f"request {request_id!r}: image {im.content_hash!r} embeddings must be "
                "finite floats"
            )
    total = sum(len(im.embeds) for im in images)
    if total > max_encoder_tokens:
        raise RequestError(
            f"request {request_id!r}: {total} image tokens exceed max_encoder_tokens "
            f"{max_encoder_tokens}"
        )
    return images
