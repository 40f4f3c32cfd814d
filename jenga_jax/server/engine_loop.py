"""The engine's own thread: the only code that touches the Engine while serving.

HTTP handlers (on the asyncio loop) submit requests and aborts as commands on a queue;
the thread adds them, steps the engine while anything is unfinished, and hands each
step's outputs back to the loop in one ``call_soon_threadsafe``. A request that
disconnects is aborted on the thread, which frees its pages at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from jenga_jax.core.errors import RequestError
from jenga_jax.engine.engine_request import RequestOutput
from jenga_jax.engine.sampling import SamplingParams

LOG = logging.getLogger("jenga_jax.server")


class QueueFull(Exception):
    """More requests in flight than the server accepts."""


class EngineStopped(Exception):
    """The engine thread is not running (shutting down, or failed)."""


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """One engine request: a choice of an HTTP request."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    cache_salt: str | None = None


class RequestHandle:
    """The engine requests of one HTTP request (its n choices), seen from the loop.

    `outputs` yields (choice index, RequestOutput) as tokens come, or an exception
    when the engine fails or stops."""

    def __init__(self, specs: Sequence[RequestSpec], loop: asyncio.AbstractEventLoop):
        self.specs = tuple(specs)
        self.index = {s.request_id: i for i, s in enumerate(self.specs)}
        self.added: asyncio.Future = loop.create_future()
        self.outputs: asyncio.Queue = asyncio.Queue()
        self.unfinished = set(self.index)
        self.arrival_time = time.perf_counter()


class EngineLoop:
    """Runs `engine` on a thread of its own; `max_in_flight` caps the requests (choices)
    submitted and not finished; more are refused with QueueFull. `metrics` (optional)
    is told about every step and finished request (on the engine thread)."""

    def __init__(self, engine, *, max_in_flight: int = 1024, metrics=None):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.engine = engine
        self.max_in_flight = max_in_flight
        self.metrics = metrics
        self.in_flight = 0  # loop side: choices submitted and not finished
        self.error: BaseException | None = None  # why the thread stopped, if it failed
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._owner: dict[str, RequestHandle] = {}  # engine thread: unfinished requests
        self._last_token: dict[str, float] = {}  # engine thread: for inter-token latency
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ loop side
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="jenga-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def submit(self, specs: Sequence[RequestSpec]) -> RequestHandle:
        """Queue the requests (all or none); raises RequestError (invalid, or too large
        for the pool), QueueFull or EngineStopped."""
        if not self.alive:
            raise EngineStopped(self._why_stopped())
        if self.in_flight + len(specs) > self.max_in_flight:
            raise QueueFull(
                f"{self.in_flight} requests in flight; the server takes at most "
                f"{self.max_in_flight} (--max-queued-requests)"
            )
        handle = RequestHandle(specs, self._loop)
        self.in_flight += len(specs)
        self._send(("add", handle))
        try:
            await handle.added
        except BaseException:
            self.in_flight -= len(handle.unfinished)
            handle.unfinished.clear()
            raise
        return handle

    def abort(self, handle: RequestHandle, request_ids=None) -> None:
        """Abort the handle's unfinished requests (those of `request_ids`, None: all);
        their pages are freed on the thread."""
        ids = handle.unfinished if request_ids is None else handle.unfinished & set(request_ids)
        if ids:
            ids = tuple(ids)
            handle.unfinished.difference_update(ids)
            self.in_flight -= len(ids)
            self._send(("abort", ids))

    async def call(self, fn: Callable):
        """fn(engine) on the engine thread, between steps; returns its result."""
        future = self._loop.create_future()
        self._send(("call", (fn, future)))
        return await future

    def call_sync(self, fn: Callable, timeout: float | None = None):
        """`call` from another thread than the loop's (tests, benchmarks)."""
        return asyncio.run_coroutine_threadsafe(self.call(fn), self._loop).result(timeout)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Abort what is left and end the thread (waits for it)."""
        if self._thread is None:
            return
        self._send(("stop", None))
        self._thread.join(timeout)

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wake.set()

    def _why_stopped(self) -> str:
        if self.error is not None:
            return f"the engine failed: {type(self.error).__name__}: {self.error}"
        return "the server is shutting down"

    def _deliver(self, deliveries) -> None:  # on the loop
        for handle, rid, item in deliveries:
            ended = isinstance(item, BaseException) or item.finished
            if ended and rid in handle.unfinished:
                handle.unfinished.discard(rid)
                self.in_flight -= 1
            handle.outputs.put_nowait((handle.index.get(rid), item))

    def _resolve(self, future: asyncio.Future, result=None, error=None) -> None:
        def set_it():
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self._loop.call_soon_threadsafe(set_it)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not self._drain():
                    break
                if engine.has_unfinished():
                    self._step()
                else:
                    if self.metrics is not None:
                        self.metrics.observe_engine(engine, force=True)
                    self._wake.wait()
                    self._wake.clear()
        except BaseException as e:  # every request hears of it
            LOG.exception("the engine thread failed")
            self.error = e
            self._fail_all(EngineStopped(self._why_stopped()))
        finally:
            self._stopping = True
            self._drain_after_stop()

    def _drain(self) -> bool:
        """Run queued commands; False on stop."""
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return True
            if kind == "add":
                self._add(arg)
            elif kind == "abort":
                for rid in arg:
                    self._abort(rid)
            elif kind == "call":
                fn, future = arg
                try:
                    self._resolve(future, fn(self.engine))
                except Exception as e:  # the caller gets it
                    self._resolve(future, error=e)
            elif kind == "stop":
                self._stopping = True
                self._fail_all(EngineStopped("the server is shutting down"))
                return False

    def _add(self, handle: RequestHandle) -> None:
        added = []
        try:
            for spec in handle.specs:
                self.engine.add_request(
                    spec.prompt_token_ids,
                    spec.params,
                    request_id=spec.request_id,
                    cache_salt=spec.cache_salt,
                )
                added.append(spec.request_id)
        except RequestError as e:
            for rid in added:
                self.engine.abort(rid)
            self._resolve(handle.added, error=e)
            return
        for rid in added:
            self._owner[rid] = handle
        self._resolve(handle.added)

    def _abort(self, rid: str) -> None:
        handle = self._owner.pop(rid, None)
        self._last_token.pop(rid, None)
        if handle is None:
            return  # finished meanwhile
        out = self.engine.abort(rid)
        self._finished(out, handle)

    def _step(self) -> None:
        outputs = self.engine.step()
        now = time.perf_counter()
        deliveries = []
        for out in outputs:
            rid = out.request_id
            handle = self._owner.get(rid)
            if handle is None:
                continue
            last = self._last_token.get(rid)
            if self.metrics is not None:
                if last is None:
                    self.metrics.ttft.observe(now - handle.arrival_time)
                else:
                    self.metrics.inter_token.observe(now - last)
            self._last_token[rid] = now
            deliveries.append((handle, rid, out))
            if out.finished:
                del self._owner[rid]
                del self._last_token[rid]
                self._finished(out, handle)
        if self.metrics is not None:
            self.metrics.observe_engine(self.engine)
        if deliveries:
            self._loop.call_soon_threadsafe(self._deliver, deliveries)

    def _finished(self, out: RequestOutput, handle: RequestHandle) -> None:
        now = time.perf_counter()
        ttft = (out.first_token_time - handle.arrival_time) if out.first_token_time else None
        if self.metrics is not None:
            self.metrics.request_finished(out, now - handle.arrival_time)
        LOG.info(
            "request %s: %d prompt tokens (%d cached), %d output tokens, finish %s, "
            "ttft %s, %.3f s in all, %d preemptions",
            out.request_id,
            len(out.prompt_token_ids),
            out.num_cached_tokens,
            len(out.output_token_ids),
            out.finish_reason,
            "-" if ttft is None else f"{ttft:.3f} s",
            now - handle.arrival_time,
            out.num_preemptions,
        )

    def _fail_all(self, error: BaseException) -> None:
        deliveries = []
        for rid, handle in list(self._owner.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # the engine may be broken; tell the clients
                pass
            deliveries.append((handle, rid, error))
        self._owner.clear()
        self._last_token.clear()
        if deliveries and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, deliveries)

    def _drain_after_stop(self) -> None:
        """Answer commands that came after the stop (they will never run)."""
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            error = EngineStopped(self._why_stopped())
            if kind == "add":
                self._resolve(arg.added, error=error)
            elif kind == "call":
                self._resolve(arg[1], error=error)
