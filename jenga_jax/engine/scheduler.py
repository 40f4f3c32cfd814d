"""Continuous batching: which requests compute how many tokens in the next step.

Each step has a token budget. Running requests that decode come first (one token
each), then running requests still prefilling (chunked), then waiting requests in
arrival order (FCFS: admission stops at the first one that does not fit, so a large
request is never starved by smaller ones behind it). A waiting request's tokens start
after its prefix-cache hit. When a running request cannot get pages, the newest
running request not yet scheduled in this step is preempted (recompute: its pages go
back, its tokens stay, it waits again at its old place in the queue) and allocation is
retried; with no one left to preempt a prefill chunk is halved, and at one token the
request preempts itself. A token still being sampled by the step in flight
(asynchronous scheduling, ``EngineRequest.in_flight``) counts as known: a decode row
allocates its slot and the step takes the token on the device; a waiting request with
one is not admitted before it arrives. Requests that could never fit were rejected at submission
(``KVCacheManager.add_request``), so a request alone with the pool always progresses.
"""

from __future__ import annotations

import dataclasses

from jenga_jax.engine.engine_request import EngineRequest, Status
from jenga_jax.engine.model_runner import ModelRunner, Work
from jenga_jax.engine.page_table_builder import StepRow


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """max_num_seqs: rows (requests) per step; max_num_batched_tokens: tokens per step;
    max_prefill_chunk: most tokens of one request per step (None: the token budget);
    max_prefill_rows: most prefilling requests per step (they share one padded step)."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 256
    max_prefill_chunk: int | None = None
    max_prefill_rows: int = 4

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be an int >= 1, got {value!r}")
        chunk = self.max_prefill_chunk
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(
                f"SchedulerConfig.max_prefill_chunk must be None or >= 1, got {chunk!r}"
            )

    @property
    def prefill_chunk(self) -> int:
        return min(
            self.max_prefill_chunk or self.max_num_batched_tokens, self.max_num_batched_tokens
        )


@dataclasses.dataclass(frozen=True)
class ScheduledStep:
    """Allocated rows of the next step: decodes (one token) and prefill chunks."""

    decode: tuple[StepRow, ...]
    prefill: tuple[StepRow, ...]
    preempted: tuple[str, ...]  # preempted while scheduling this step

    @property
    def num_rows(self) -> int:
        return len(self.decode) + len(self.prefill)


class Scheduler:
    """Owns the waiting and running queues; allocates through the runner's manager."""

    def __init__(self, runner: ModelRunner, config: SchedulerConfig):
        self.runner = runner
        self.manager = runner.manager
        self.config = config
        self.waiting: list[EngineRequest] = []  # by arrival_index
        self.running: list[EngineRequest] = []  # by arrival_index
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queues
    def add(self, req: EngineRequest) -> None:
        self._insert(self.waiting, req)

    def remove(self, req: EngineRequest) -> None:
        """Forget a request (finished or aborted); the caller frees its pages."""
        queue = self.running if req.status is Status.RUNNING else self.waiting
        queue.remove(req)

    @staticmethod
    def _insert(queue: list[EngineRequest], req: EngineRequest) -> None:
        i = len(queue)
        while i and queue[i - 1].arrival_index > req.arrival_index:
            i -= 1
        queue.insert(i, req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ steps
    def _known(self, req: EngineRequest) -> int:
        """Tokens the request has or will have once its tokens being sampled arrive."""
        return self.manager.num_tokens(req.request_id) + len(req.pending) + req.in_flight

    def _computed(self, req: EngineRequest) -> int:
        return self.manager.num_computed_tokens(req.request_id)

    def _aligned(self, start: int, n: int, known: int) -> int:
        """End a prefill chunk on a state checkpoint when that still computes something,
        so that later requests can hit the prefix (models with state kinds)."""
        interval = self.manager.checkpoint_interval
        end = start + n
        if interval and end < known and (end // interval) * interval > start:
            return (end // interval) * interval - start
        return n

    def _preempt(self, req: EngineRequest) -> None:
        self.runner.preempt(req.request_id)
        self.manager.append_tokens(req.request_id, req.pending)  # lookups must see them
        req.pending.clear()
        self.running.remove(req)
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._insert(self.waiting, req)

    def _allocate(self, req: EngineRequest, n: int) -> StepRow | None:
        unknown = req.in_flight if req.status is Status.RUNNING else 0
        rows, _ = self.runner.allocate([Work(req.request_id, n, tuple(req.pending), unknown)])
        if rows:
            req.pending.clear()  # the manager has them now
            return rows[0]
        return None

    def schedule(self) -> ScheduledStep:
        """Allocate the next step's rows (nothing runs)."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        decode, prefill, preempted = [], [], []
        scheduled: set[str] = set()

        def victim(of: EngineRequest) -> EngineRequest | None:
            for other in reversed(self.running):
                if other is not of and other.request_id not in scheduled:
                    return other
            return None

        def run_row(req: EngineRequest, n: int) -> StepRow | None:
            while True:
                row = self._allocate(req, n)
                if row is not None:
                    return row
                other = victim(req)
                if other is not None:
                    self._preempt(other)
                    preempted.append(other.request_id)
                elif n > 1:
                    n = max(1, n // 2)
                else:
                    self._preempt(req)
                    preempted.append(req.request_id)
                    return None

        decoding, prefilling = [], []
        for r in self.running:
            one_left = self._computed(r) == self._known(r) - 1
            (decoding if one_left else prefilling).append(r)
        for req in decoding:
            if budget == 0 or len(decode) == cfg.max_num_seqs:
                break
            if req.status is not Status.RUNNING:  # preempted for an older request
                continue
            row = run_row(req, 1)
            if row is not None:
                decode.append(row)
                scheduled.add(req.request_id)
                budget -= 1
        for req in prefilling:
            if budget == 0 or len(prefill) == cfg.max_prefill_rows:
                break
            if req.status is not Status.RUNNING or len(decode) + len(prefill) == cfg.max_num_seqs:
                continue
            start, known = self._computed(req), self._known(req)
            if start == known:  # nothing to compute until a token is sampled
                continue
            n = self._aligned(start, min(known - start, budget, cfg.prefill_chunk), known)
            row = run_row(req, n)
            if row is not None:
                prefill.append(row)
                scheduled.add(req.request_id)
                budget -= row.num_tokens
        while self.waiting and budget > 0 and len(prefill) < cfg.max_prefill_rows:
            if (
                len(self.running) >= cfg.max_num_seqs
                or len(decode) + len(prefill) >= cfg.max_num_seqs
            ):
                break
            req = self.waiting[0]
            if req.in_flight:  # preempted while its last token is being sampled: wait for it
                break
            start, known = self.manager.lookup(req.request_id), self._known(req)
            n = self._aligned(start, min(known - start, budget, cfg.prefill_chunk), known)
            row = self._allocate(req, n)
            while row is None and not self.running and n > 1:  # alone: smaller chunks fit
                n = max(1, n // 2)
                row = self._allocate(req, n)
            if row is None:
                if not self.running:
                    raise RuntimeError(
                        f"request {req.request_id!r} cannot be admitted into an idle pool "
                        "(add_request should have rejected it)"
                    )
                break  # FCFS: nothing behind it goes first
            self.waiting.pop(0)
            self._insert(self.running, req)
            req.status = Status.RUNNING
            if req.num_preemptions == 0:  # first admission: its tokens follow the hit
                req.num_cached_tokens = row.start
            prefill.append(row)
            scheduled.add(req.request_id)
            budget -= row.num_tokens
        return ScheduledStep(tuple(decode), tuple(prefill), tuple(preempted))
