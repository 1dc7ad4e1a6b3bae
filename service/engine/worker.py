"""The engine: the scheduler's batches run through three overlapped stages, one thread each.

    render (+ normalise, onto the device) → forward → reduce (+ settle the requests that are done)

While the model runs batch N, the next batch is rendered; at most one batch is ahead of the
forward (two slots: the batch in the forward and the one rendered next), so memory and latency stay
bounded and a batch is formed as late as possible (fairer, and abandoned requests drop out first).
Every request has exactly one outcome — its results, or one error — delivered on its event loop. A
failing batch fails exactly its requests; out of memory halves a group once; a fault that is not an
`Exception` kills the engine, and every waiting request gets 503 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from models import LoadedModel
from service.core.embedding import (
    Chunk,
    ImageJob,
    ImageResult,
    RenderedBatch,
    forward_batch,
    reduce_batch,
    render_batch,
)
from service.core.errors import DeadlineExceeded, InternalError, NotReady, ServiceError
from service.engine.integral import TimeIntegral
from service.engine.scheduler import Batch, BatchingConfig, SamplesRange, Scheduler, Ticket
from service.metrics import Metrics

log = logging.getLogger("metta.engine")
_POLL_S = 0.1  # every blocking wait in a stage wakes at least this often
SWITCH_INTERVAL_S = 0.0005  # for the process (see Engine.__aenter__)


class WorkerDied(NotReady):
    """The inference worker has stopped: nothing more can be computed by this process."""


@dataclass
class EngineCounters:
    """Plain counts for tests and debugging (the metrics carry the same for Prometheus)."""

    batches: int = 0
    crops_run: int = 0
    crops_skipped_in_flight: int = 0  # rendered, then dropped before the forward: their request was abandoned
    forward_seconds: float = 0.0
    forward_input_wait_seconds: float = 0.0  # the forward stage idle while a batch was on its way
    batch_members: list[tuple[int, ...]] = field(default_factory=list)  # request ids per batch (last 1000)


@dataclass
class _Waiter:
    future: asyncio.Future[list[ImageResult]]
    loop: asyncio.AbstractEventLoop


@dataclass
class _InFlight:
    batch: Batch
    rendered: RenderedBatch
    render_s: float
    forward_s: float = 0.0
    outputs: list[np.ndarray | None] = field(default_factory=list)


_STOP = None  # passed down the stage queues: no more batches


class Engine:
    """Start with `async with Engine(...)`; `admit(jobs)` then `await result(ticket)` gives each image's result."""

    def __init__(self, model: LoadedModel, config: BatchingConfig, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic, *, render_workers: int = 1) -> None:
        self.model = model
        self.config = config
        self.metrics = metrics
        self.counters = EngineCounters()
        self.scheduler = Scheduler(config, clock)
        self.dead: BaseException | None = None
        self._cond = threading.Condition()  # guards the scheduler and the waiters
        self._waiters: dict[int, _Waiter] = {}
        self._stopping = False
        self._slots = threading.Semaphore(2)  # batches rendered or in the forward: this one and the next
        self._rendered: queue.Queue[_InFlight | None] = queue.Queue()
        self._forwarded: queue.Queue[_InFlight | None] = queue.Queue()
        # Rendering one batch's images in parallel: on a CPU the resizes are most of the per-crop work
        # outside the model, and torch releases the GIL in them.
        self._render_pool = ThreadPoolExecutor(render_workers, thread_name_prefix="metta-render")
        self._threads = [threading.Thread(target=self._guarded, args=(stage,), name=f"metta-{name}", daemon=True)
                         for name, stage in (("render", self._render_stage), ("forward", self._forward_stage),
                                             ("reduce", self._reduce_stage))]
        metrics.max_queue_crops.set(config.max_queue_crops)
        metrics.max_batch_crops.set(config.max_batch_crops)
        metrics.queue_crops.set_function(self._locked(lambda: self.scheduler.requested_crops))
        metrics.queue_wait_estimate.set_function(self._locked(self.scheduler.wait_estimate_s))
        # The same two figures integrated over time, exactly: they move only at scheduler events (admit,
        # abandon, expire, batch formed, finished with a new pace, failed), and each of those is followed
        # by `_queue_changed()` under the lock. The exported counters give the time-average over any window.
        self._integrals = (TimeIntegral(lambda: self.scheduler.requested_crops, self.scheduler.clock),
                           TimeIntegral(self.scheduler.wait_estimate_s, self.scheduler.clock))
        metrics.queue_crops_integral.set_function(self._locked(self._integrals[0].total))
        metrics.queue_wait_estimate_integral.set_function(self._locked(self._integrals[1].total))

    def _locked(self, read: Callable[[], float]) -> Callable[[], float]:
        def locked_read() -> float:
            with self._cond:
                return read()

        return locked_read

    def _queue_changed(self) -> None:
        """Call under the lock after every scheduler event: closes the queue figures' integral pieces."""
        for integral in self._integrals:
            integral.changed()

    # ---- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Engine:
        # The stages hand the GIL to each other several times per batch (every torch call releases it);
        # at Python's default 5 ms switch interval a stage that wants it back waits up to 5 ms each time.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        for thread in self._threads:
            thread.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop(grace_s=0.0)

    @property
    def alive(self) -> bool:
        return self.dead is None and all(thread.is_alive() for thread in self._threads)

    @property
    def pending_requests(self) -> int:
        with self._cond:
            return self.scheduler.pending_requests

    @property
    def queued_crops(self) -> int:
        """Crops admitted and not yet computed (or dropped)."""
        with self._cond:
            return self.scheduler.queued_crops

    @property
    def crops_dropped(self) -> int:
        """Crops of abandoned requests that never ran."""
        with self._cond:
            return self.scheduler.crops_dropped + self.counters.crops_skipped_in_flight

    async def drain(self, grace_s: float) -> None:
        """Refuse new work, then wait up to grace_s for admitted work to finish."""
        with self._cond:
            self.scheduler.closed = True
        deadline = time.monotonic() + grace_s
        while self.pending_requests and self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def stop(self, grace_s: float) -> None:
        await self.drain(grace_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 10.0)
        self._render_pool.shutdown(wait=False)
        self._fail_all(NotReady("the service is shutting down"))

    # ---- the event-loop side ---------------------------------------------------------------------
    async def submit(self, jobs: Sequence[ImageJob], timeout_s: float) -> list[ImageResult]:
        """Admit, then wait for the result (see `admit` and `result`)."""
        return await self.result(self.admit(jobs, timeout_s), timeout_s)

    def admit(self, jobs: Sequence[ImageJob], timeout_s: float | None = None, *,
              auto: SamplesRange | None = None) -> Ticket:
        """Queue a request's images (on the event loop); raises Overloaded or NotReady at once.

        `auto`: the range of an auto-S request, whose images were planned at the S `check_room` gave it
        (`Scheduler.admit_auto`)."""
        loop = asyncio.get_running_loop()
        with self._cond:
            self._check_alive()
            if auto is None:
                ticket = self.scheduler.admit(jobs, timeout_s=timeout_s)
            else:
                ticket = self.scheduler.admit_auto(jobs, auto, timeout_s=timeout_s)
            self._queue_changed()
            self._waiters[ticket.id] = _Waiter(loop.create_future(), loop)
            self._cond.notify_all()
        return ticket

    def check_room(self, images: int, samples: int, timeout_s: float | None = None,
                   samples_range: SamplesRange | None = None) -> int:
        """Raise now what `admit` would raise for this request's shape (Overloaded, NotReady), before its images
        are decoded: under overload a refusal then costs no decoding. Returns the S its images are planned at:
        `samples`, or for an auto-S request the S the scheduler gives it from the queue as it is now (so each
        image is planned as it decodes, and no decoded image waits for its S). `admit` still checks again."""
        with self._cond:
            self._check_alive()
            if self.scheduler.closed:
                raise NotReady("the service is shutting down")
            if samples_range is not None:
                return self.scheduler.auto_samples(images, samples_range, timeout_s)
            self.scheduler.check(images * samples, timeout_s)
            return samples

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise WorkerDied("the inference worker has stopped")

    async def result(self, ticket: Ticket, timeout_s: float) -> list[ImageResult]:
        """Wait for an admitted request; raises DeadlineExceeded, NotReady or InternalError."""
        waiter = self._waiters[ticket.id]  # kept until here, so an outcome delivered early is not lost
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), timeout_s)
        except TimeoutError:
            self.abandon(ticket, "deadline")
            raise DeadlineExceeded(f"the request did not finish within its deadline ({timeout_s:g} s after it was "
                                   "queued)") from None
        except asyncio.CancelledError:
            self.abandon(ticket, "client_gone")
            raise
        finally:
            with self._cond:
                self._waiters.pop(ticket.id, None)

    def abandon(self, ticket: Ticket, reason: str) -> None:
        """The client stopped waiting: the scheduler frees its room now; its crops not yet run never run.
        (The caller counts it: a 504 where it is answered, a client gone where it is noticed.)"""
        with self._cond:
            self.scheduler.abandon(ticket, reason)
            self._queue_changed()
            waiter = self._waiters.get(ticket.id)
        if waiter is not None and not waiter.future.done():
            waiter.future.cancel()

    # ---- the stages (worker threads) -------------------------------------------------------------
    def _guarded(self, stage: Callable[[], None]) -> None:
        try:
            stage()
        except BaseException as exc:  # an unrecoverable fault: this process can compute nothing more
            log.exception("inference worker died")
            self.dead = exc
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            self._rendered.put(_STOP)
            self._forwarded.put(_STOP)
            self._fail_all(WorkerDied("the inference worker has stopped"))

    def _render_stage(self) -> None:
        while True:
            while not self._slots.acquire(timeout=_POLL_S):
                if self.dead is not None:
                    return
            batch = self._next_batch()
            if batch is None:
                self._rendered.put(_STOP)
                return
            started = time.perf_counter()
            try:
                rendered = render_batch(self.model, batch.chunks, self._render_pool.map)
            except Exception as exc:
                self._slots.release()
                self._fail_batch(batch, exc, "render")
                continue
            render_s = time.perf_counter() - started
            self.metrics.augment_duration.observe(render_s)
            self._rendered.put(_InFlight(batch, rendered, render_s))

    def _next_batch(self) -> Batch | None:
        """Wait for work (answering expired requests meanwhile); None means: stop now."""
        with self._cond:
            while True:
                for ticket in self.scheduler.expire():
                    self._settle_locked(ticket, DeadlineExceeded("the request's deadline passed in the queue"))
                    self._queue_changed()
                if self.dead is not None:
                    return None
                fill_wait = self.scheduler.fill_wait_s()
                if fill_wait <= 0:
                    batch = self.scheduler.next_batch()
                    if batch is not None:
                        self._queue_changed()
                        break
                    if self._stopping:
                        return None
                self._cond.wait(min(_POLL_S, fill_wait) if fill_wait > 0 else _POLL_S)
        for ticket in batch.members:
            if ticket.first_batched_at == batch.formed_at:
                self.metrics.queue_wait.observe(batch.formed_at - ticket.admitted_at)
        return batch

    def _forward_stage(self) -> None:
        while True:
            waited_from = time.perf_counter()
            item = self._rendered.get()
            if item is _STOP:
                self._forwarded.put(_STOP)
                return
            # Idle time that a faster render would have saved: counted from when both the forward was free
            # and the batch was formed, so an idle server waiting for requests counts nothing.
            since_formed = self.scheduler.clock() - item.batch.formed_at
            input_wait = max(0.0, min(time.perf_counter() - waited_from, since_formed))
            self.counters.forward_input_wait_seconds += input_wait
            self.metrics.forward_input_wait.observe(input_wait)
            with self._cond:
                gone = {id(job) for ticket in item.batch.members if not self.scheduler.running(ticket)
                        for job in ticket.jobs}
            started = time.perf_counter()
            try:
                item.outputs = forward_batch(self.model, item.rendered, skip=_abandoned_in(gone))
            except Exception as exc:
                self._fail_batch(item.batch, exc, "forward")
                continue
            finally:
                self._slots.release()
            item.forward_s = time.perf_counter() - started
            skipped = sum(len(c.views) for c, out in zip(item.rendered.chunks, item.outputs, strict=True)
                          if out is None)
            self.counters.crops_skipped_in_flight += skipped
            self.counters.forward_seconds += item.forward_s
            self.metrics.forward_duration.observe(item.forward_s)
            self._forwarded.put(item)

    def _reduce_stage(self) -> None:
        while True:
            item = self._forwarded.get()
            if item is _STOP:
                return
            started = time.perf_counter()
            # Adding the embeddings lowers the queued crops outside the lock; the integral takes the drop at
            # `finished` below, so the time this reduce takes still counts at the figure's old value.
            reduce_batch(item.rendered, item.outputs)
            batch = item.batch
            ran = batch.crops - sum(len(c.views) for c, out in zip(item.rendered.chunks, item.outputs, strict=True)
                                    if out is None)
            reduce_s = time.perf_counter() - started
            with self._cond:
                complete = self.scheduler.finished(batch, (item.render_s, item.forward_s, reduce_s), ran)
                self._queue_changed()
                waiters = [(ticket, self._waiters.get(ticket.id)) for ticket in complete]
            self.counters.batches += 1
            self.counters.crops_run += ran
            self.counters.batch_members.append(tuple(t.id for t in batch.members))
            del self.counters.batch_members[:-1000]
            self.metrics.crops.inc(ran)
            self.metrics.batch_crops.observe(batch.crops)
            self.metrics.batch_requests.observe(len(batch.members))
            for ticket, waiter in waiters:
                settle_started = time.perf_counter()
                try:
                    outcome: list[ImageResult] | ServiceError = [job.result() for job in ticket.jobs]
                except Exception as exc:
                    log.error("reduce failed: %r", exc)
                    outcome = InternalError("the embeddings could not be reduced")
                reduce_s += time.perf_counter() - settle_started
                _deliver(waiter, outcome)
            self.metrics.reduce_duration.observe(reduce_s)

    # ---- settling --------------------------------------------------------------------------------
    def _fail_batch(self, batch: Batch, exc: Exception, stage: str) -> None:
        """A stage failed on a batch: exactly that batch's requests fail (the engine lives on)."""
        log.error("%s failed on a batch of %d crops from %d requests: %r", stage, batch.crops, len(batch.members),
                  exc)
        error = InternalError("the model failed while computing this request")
        with self._cond:
            for ticket in self.scheduler.failed(batch):
                self._settle_locked(ticket, error)
            self._queue_changed()

    def _settle_locked(self, ticket: Ticket, outcome: list[ImageResult] | BaseException) -> None:
        _deliver(self._waiters.get(ticket.id), outcome)

    def _fail_all(self, error: ServiceError) -> None:
        with self._cond:
            for ticket in self.scheduler.fail_all():
                self._settle_locked(ticket, error)
            self._queue_changed()


def _abandoned_in(gone: set[int]) -> Callable[[Chunk], bool]:
    return lambda chunk: id(chunk.job) in gone


def _deliver(waiter: _Waiter | None, outcome: list[ImageResult] | BaseException) -> None:
    """The one outcome of a request, set on its event loop (ignored if nobody waits any more)."""
    if waiter is None:
        return

    def deliver() -> None:
        if waiter.future.done():
            return
        if isinstance(outcome, BaseException):
            waiter.future.set_exception(outcome)
        else:
            waiter.future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        waiter.loop.call_soon_threadsafe(deliver)
