"""A request inside the engine: what it asked for, what it produced, when."""

from __future__ import annotations

import dataclasses
import enum

from jenga_jax.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (recomputes when admitted again)
    RUNNING = "running"  # holds pages; prefilling or decoding
    FINISHED = "finished"


@dataclasses.dataclass
class EngineRequest:
    """Host-side state of one request (the manager holds its tokens and pages).

    `pending` are tokens sampled but not yet given to the manager: the next step that
    schedules the request appends them (a refused or preempted row keeps them here).
    `in_flight`: tokens being sampled by dispatched steps that the host has not seen.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_index: int  # FCFS order: smaller first; preempted requests keep theirs
    arrival_time: float
    status: Status = Status.WAITING
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)  # if asked for
    pending: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort"
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit of the first admission
    in_flight: int = 0

    def output(self, new_token_ids: tuple[int, ...] = ()) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            new_token_ids=tuple(new_token_ids),
            output_token_ids=tuple(self.output_token_ids),
            finished=self.status is Status.FINISHED,
            finish_reason=self.finish_reason,
            num_cached_tokens=self.num_cached_tokens,
            num_preemptions=self.num_preemptions,
            arrival_time=self.arrival_time,
            first_token_time=self.first_token_time,
            finish_time=self.finish_time,
            output_logprobs=tuple(self.output_logprobs) if self.params.logprobs else None,
        )


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """What a request has produced: `new_token_ids` this step, `output_token_ids` so far.

    Times are `time.perf_counter()` seconds: added, first token sampled, finished (None
    until then); time to first token = first_token_time - arrival_time."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    new_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int
    num_preemptions: int
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    text: str | None = None  # the decoded output of a finished request (with a tokenizer)
    # log-probability of each output token under the distribution it was drawn from
    # (temperature, top-k, top-p applied), when SamplingParams.logprobs; else None
    output_logprobs: tuple[float, ...] | None = None
