"""The batching engine: one worker thread per device owns the model and batches crops across requests.

Requests arrive already decoded and planned (a list of `ImageJob`s). Admission is bounded in
crops (429 past `max_queue_crops`). The worker takes up to `max_batch_crops` crops per batch,
at most `chunk_crops` from each queued request per turn, round-robin (turns repeat while the batch
has room), so a huge request never holds small ones behind it for its whole duration. Each request
has exactly one outcome: its result, or one error, delivered on the event loop; a request that was
abandoned (deadline, client gone) has its remaining crops dropped before they run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from models import LoadedModel
from service.core.embedding import Chunk, ImageJob, ImageResult, StageTimes, run_chunks
from service.core.errors import DeadlineExceeded, InternalError, NotReady, Overloaded, ServiceError
from service.core.policies import View
from service.metrics import Metrics

log = logging.getLogger("metta.engine")
_POLL_S = 0.1  # every blocking wait in the worker wakes at least this often


class WorkerDied(NotReady):
    """The inference worker has stopped: nothing more can be computed by this process."""


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_crops: int
    chunk_crops: int
    max_wait_ms: float
    max_queue_crops: int

    def __post_init__(self) -> None:
        if self.max_batch_crops < 1 or self.chunk_crops < 1 or self.max_queue_crops < 1:
            raise ValueError("max_batch_crops, chunk_crops and max_queue_crops must be at least 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")


@dataclass
class EngineCounters:
    """Plain counts for tests and debugging (the metrics carry the same for Prometheus)."""

    batches: int = 0
    crops_run: int = 0
    forward_seconds: float = 0.0
    crops_dropped: int = 0
    seconds_per_crop: float | None = None  # moving average of batch wall time (render + forward) per crop
    batch_members: list[tuple[int, ...]] = field(default_factory=list)  # request ids per batch (last 1000)


class PendingRequest:
    """One admitted request: its images' jobs, its future, and how far it has got."""

    def __init__(self, request_id: int, jobs: Sequence[ImageJob], future: asyncio.Future[list[ImageResult]],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.id = request_id
        self.jobs = list(jobs)
        self.future = future
        self.loop = loop
        self.crops = sum(len(job.views) for job in jobs)
        self.admitted_at = time.perf_counter()
        self.first_batched_at: float | None = None
        self.abandoned: str | None = None  # set on the event loop: "deadline" or "client_gone"
        self._cursor = 0

    @property
    def unhanded(self) -> int:
        return sum(job.pending for job in self.jobs[self._cursor :])

    @property
    def uncomputed(self) -> int:
        return self.crops - sum(job.stats.count for job in self.jobs)

    def take(self, room: int) -> list[Chunk]:
        """The next chunks of this request, up to `room` crops, in image order."""
        chunks = []
        while room > 0 and self._cursor < len(self.jobs):
            job = self.jobs[self._cursor]
            chunk = job.take(room)
            room -= len(chunk.views)
            if chunk.views:
                chunks.append(chunk)
            if job.pending == 0:
                self._cursor += 1
        return chunks

    def done(self) -> bool:
        return all(job.done for job in self.jobs)


def _is_out_of_memory(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


class Engine:
    """Start with `async with Engine(...)`; `await submit(jobs)` gives each image's result."""

    def __init__(self, model: LoadedModel, config: BatchingConfig, metrics: Metrics) -> None:
        self.model = model
        self.config = config
        self.metrics = metrics
        self.counters = EngineCounters()
        self._cond = threading.Condition()
        self._queue: collections.deque[PendingRequest] = collections.deque()  # with crops to hand out
        self._running: dict[int, PendingRequest] = {}  # admitted and not yet settled
        self._ids = itertools.count(1)
        self._stopping = False
        self._closed = False  # no new admissions (draining or stopped)
        self.dead: BaseException | None = None
        self._thread = threading.Thread(target=self._worker, name="metta-inference", daemon=True)
        metrics.max_queue_crops.set(config.max_queue_crops)
        metrics.max_batch_crops.set(config.max_batch_crops)

    # ---- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Engine:
        self._thread.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop(grace_s=0.0)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.dead is None

    @property
    def pending_requests(self) -> int:
        with self._cond:
            return len(self._running)

    @property
    def queued_crops(self) -> int:
        """Crops admitted and not yet computed (or dropped)."""
        with self._cond:
            return self._queued_crops_locked()

    def _queued_crops_locked(self) -> int:
        return sum(request.uncomputed for request in self._running.values())

    async def drain(self, grace_s: float) -> None:
        """Refuse new work, then wait up to grace_s for admitted work to finish."""
        with self._cond:
            self._closed = True
        deadline = time.monotonic() + grace_s
        while self.pending_requests and self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def stop(self, grace_s: float) -> None:
        await self.drain(grace_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        await asyncio.to_thread(self._thread.join, 10.0)
        self._fail_all(NotReady("the service is shutting down"))

    # ---- the event-loop side ---------------------------------------------------------------------
    async def submit(self, jobs: Sequence[ImageJob], timeout_s: float) -> list[ImageResult]:
        """Admit, then wait for the result (see `admit` and `result`)."""
        return await self.result(self.admit(jobs), timeout_s)

    async def result(self, request: PendingRequest, timeout_s: float) -> list[ImageResult]:
        """Wait for an admitted request; raises DeadlineExceeded, NotReady or InternalError."""
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), timeout_s)
        except TimeoutError:
            self.abandon(request, "deadline")
            raise DeadlineExceeded(f"the request did not finish within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            self.abandon(request, "client_gone")
            raise

    def admit(self, jobs: Sequence[ImageJob], timeout_s: float | None = None) -> PendingRequest:
        """Queue a request's images (on the event loop); raises Overloaded or NotReady at once.

        With `timeout_s`, a request that the work ahead of it would push past its deadline (at the speed
        measured lately) is refused now with 429, instead of computing crops nobody will get.
        """
        loop = asyncio.get_running_loop()
        crops = sum(len(job.views) for job in jobs)
        with self._cond:
            if self.dead is not None:
                raise WorkerDied("the inference worker has stopped")
            if self._closed:
                raise NotReady("the service is shutting down")
            queued = self._queued_crops_locked()
            if queued + crops > self.config.max_queue_crops:
                self.metrics.rejected.labels("overloaded").inc()
                retry_after = max(1, round(self._estimated_wait_s(queued)))
                raise Overloaded(
                    f"the queue is full ({queued} of {self.config.max_queue_crops} crops queued);"
                    " retry later", headers={"Retry-After": str(retry_after)})
            expected_s = self._estimated_wait_s(self._crops_until_done_locked(crops))
            if timeout_s is not None and self.counters.seconds_per_crop is not None and expected_s > timeout_s:
                self.metrics.rejected.labels("overloaded").inc()
                retry_after = max(1, round(self._estimated_wait_s(queued)))
                raise Overloaded(
                    f"with {queued} crops queued, this request's {crops} crops would take about"
                    f" {expected_s:.0f} s, past the {timeout_s:g} s deadline; retry later",
                    headers={"Retry-After": str(retry_after)})
            request = PendingRequest(next(self._ids), jobs, loop.create_future(), loop)
            self._queue.append(request)
            self._running[request.id] = request
            self.metrics.queue_crops.set(queued + crops)
            self._cond.notify_all()
        return request

    def _crops_until_done_locked(self, crops: int) -> int:
        """Crops computed before a new request of `crops` would finish: round-robin gives it a chunk per
        turn, so each request queued ahead gets as many turns, never more than it has left."""
        turns = -(-crops // self.config.chunk_crops)
        share = turns * self.config.chunk_crops
        return crops + sum(min(request.uncomputed, share) for request in self._running.values())

    def _estimated_wait_s(self, queued_crops: int) -> float:
        """How long `queued_crops` take at the speed measured lately (1 s before anything ran)."""
        per_crop = self.counters.seconds_per_crop
        return 1.0 if per_crop is None else queued_crops * per_crop

    def abandon(self, request: PendingRequest, reason: str) -> None:
        """On the event loop: the client stopped waiting; the worker drops this request's remaining crops."""
        if request.abandoned is None and not request.future.done():
            request.abandoned = reason
            request.future.cancel()
            self.metrics.rejected.labels(reason).inc()
            with self._cond:
                self._cond.notify_all()

    # ---- the worker thread -----------------------------------------------------------------------
    def _worker(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run_batch(*batch)
        except BaseException as exc:
            log.exception("inference worker died")
            self.dead = exc
            self.metrics.ready.set(0)
            self._fail_all(WorkerDied("the inference worker has stopped"))

    def _next_batch(self) -> tuple[list[Chunk], list[PendingRequest]] | None:
        """Wait for work; form one batch round-robin. None means: stop now."""
        config = self.config
        with self._cond:
            while True:
                self._drop_abandoned()
                if self._queue:
                    break
                if self._stopping:
                    return None
                self._cond.wait(_POLL_S)
            if config.max_wait_ms > 0 and len(self._queue) > 1:
                # Others are queued too: give the batch a moment to fill. A lone request never waits.
                wait_until = time.monotonic() + config.max_wait_ms / 1000
                while (sum(r.unhanded for r in self._queue) < config.max_batch_crops
                       and not self._stopping and time.monotonic() < wait_until):
                    self._cond.wait(max(0.0, min(_POLL_S, wait_until - time.monotonic())))
                self._drop_abandoned()
            chunks: list[Chunk] = []
            members: list[PendingRequest] = []
            room = config.max_batch_crops
            served: list[PendingRequest] = []
            while room > 0 and (self._queue or served):
                if not self._queue:
                    # Every queued request had its turn and there is still room (a lone request, say):
                    # another round, so a batch is never sent out part-empty while crops wait.
                    self._queue.extend(served)
                    served = []
                request = self._queue.popleft()
                taken = request.take(min(room, config.chunk_crops))
                room -= sum(len(chunk.views) for chunk in taken)
                chunks += taken
                if request not in members:
                    members.append(request)
                if request.unhanded > 0:
                    served.append(request)  # back of the line: round-robin
            self._queue.extend(served)
            now = time.perf_counter()
            for request in members:
                if request.first_batched_at is None:
                    request.first_batched_at = now
                    self.metrics.queue_wait.observe(now - request.admitted_at)
            return chunks, members

    def _drop_abandoned(self) -> None:
        """Under the lock: forget requests whose client stopped waiting; their crops never run."""
        for request in [r for r in self._running.values() if r.abandoned is not None]:
            self._forget(request)
            dropped = request.unhanded
            self.counters.crops_dropped += dropped

    def _forget(self, request: PendingRequest) -> None:
        """Under the lock: remove a request from the queue and release its uncomputed crops."""
        if self._running.pop(request.id, None) is None:
            return
        if request in self._queue:
            self._queue.remove(request)
        self.metrics.queue_crops.set(self._queued_crops_locked())

    def _run_batch(self, chunks: list[Chunk], members: list[PendingRequest]) -> None:
        crops = sum(len(chunk.views) for chunk in chunks)
        started = time.perf_counter()
        try:
            times = self._run_with_oom_retry(chunks)
        except Exception as exc:  # a failing forward fails exactly this batch's requests
            log.error("forward failed on a batch of %d crops from %d requests: %r", crops, len(members), exc)
            error = InternalError("the model failed while computing this request")
            with self._cond:
                for request in members:
                    self._forget(request)
            for request in members:
                self._settle(request, error)
            return
        self.counters.batches += 1
        self.counters.crops_run += crops
        self.counters.forward_seconds += times.forward
        per_crop = (time.perf_counter() - started) / crops
        previous = self.counters.seconds_per_crop
        # A short memory (the last ~10 batches): the speed changes with S, image sizes and machine load.
        self.counters.seconds_per_crop = per_crop if previous is None else 0.9 * previous + 0.1 * per_crop
        self.counters.batch_members.append(tuple(r.id for r in members))
        del self.counters.batch_members[:-1000]
        self.metrics.crops.inc(crops)
        self.metrics.batch_crops.observe(crops)
        self.metrics.batch_requests.observe(len(members))
        self.metrics.augment_duration.observe(times.augment)
        self.metrics.forward_duration.observe(times.forward)
        with self._cond:
            self.metrics.queue_crops.set(self._queued_crops_locked())
            finished = [r for r in members if r.done() and r.id in self._running]
            for request in finished:
                self._running.pop(request.id)
        for request in finished:
            started = time.perf_counter()
            try:
                results: list[ImageResult] | ServiceError = [job.result() for job in request.jobs]
            except Exception as exc:
                log.error("reduce failed: %r", exc)
                results = InternalError("the embeddings could not be reduced")
            self.metrics.reduce_duration.observe(times.reduce + time.perf_counter() - started)
            self._settle(request, results)

    def _run_with_oom_retry(self, chunks: list[Chunk]) -> StageTimes:
        try:
            return run_chunks(self.model, chunks)
        except Exception as exc:
            views = [(chunk.job, view) for chunk in chunks for view in chunk.views]
            if not _is_out_of_memory(exc) or len(views) < 2:
                raise
            log.warning("out of memory on %d crops: retrying once as two halves", len(views))
            _empty_device_cache(self.model)
            half = len(views) // 2
            first = run_chunks(self.model, _regroup(views[:half]))
            second = run_chunks(self.model, _regroup(views[half:]))
            return StageTimes(first.augment + second.augment, first.forward + second.forward,
                              first.reduce + second.reduce, first.forwards + second.forwards)

    def _settle(self, request: PendingRequest, outcome: list[ImageResult] | BaseException) -> None:
        """Deliver the one outcome of a request on its event loop (ignored if it was abandoned)."""

        def deliver() -> None:
            if request.future.done():
                return
            if isinstance(outcome, BaseException):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            request.loop.call_soon_threadsafe(deliver)

    def _fail_all(self, error: ServiceError) -> None:
        with self._cond:
            requests = list(self._running.values())
            for request in requests:
                self._forget(request)
        for request in requests:
            self._settle(request, error)


def _regroup(views: Sequence[tuple[ImageJob, View]]) -> list[Chunk]:
    """Consecutive views of the same job → one chunk each (for the OOM retry's halves)."""
    chunks: list[Chunk] = []
    for job, view in views:
        if chunks and chunks[-1].job is job:
            chunks[-1].views.append(view)
        else:
            chunks.append(Chunk(job, [view]))
    return chunks


def _empty_device_cache(model: LoadedModel) -> None:
    if model.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
