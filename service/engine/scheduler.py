"""The scheduler: admission, round-robin batches, deadlines and abandonment — a plain object, no threads.

It decides what runs and in which order; it never computes anything. Every method is called
under the engine's lock, and time comes from an injected clock, so unit tests drive it step by
step. Admission is bounded in crops (429 past `max_queue_crops`) and by deadline (a request the
queue ahead would push past its deadline, at the speed measured lately, is refused at once). A
batch takes up to `max_batch_crops` crops, at most `chunk_crops` from each queued request per turn,
round-robin (turns repeat while the batch has room), so a huge request never holds small ones
behind it. An abandoned request (client gone, deadline passed) leaves the queue at once: its room
is free for the next admission and its remaining crops never run.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from service.core.embedding import Chunk, ImageJob
from service.core.errors import InvalidOption, NotReady, Overloaded, ServiceError


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_crops: int
    chunk_crops: int
    max_wait_ms: float
    max_queue_crops: int
    # samples="auto": the wait target, in full batches at the measured pace, shared by the requests queued
    # (Scheduler.auto_samples). The default 8 is chosen by measurement (docs/benchmarks.md, "Auto S without
    # deadlines"): 32 clients then get S=8 each, the smallest S whose mean keeps cosine >= 0.99 to the S=32 mean.
    auto_wait_batches: float = 8.0

    def __post_init__(self) -> None:
        if self.max_batch_crops < 1 or self.chunk_crops < 1 or self.max_queue_crops < 1:
            raise ValueError("max_batch_crops, chunk_crops and max_queue_crops must be at least 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        if self.auto_wait_batches <= 0:
            raise ValueError("auto_wait_batches must be positive")

    @property
    def auto_wait_crops(self) -> float:
        """The auto-S wait target in crops: at any pace, the crops that many full batches hold."""
        return self.auto_wait_batches * self.max_batch_crops


@dataclass(frozen=True)
class SamplesRange:
    """An auto-S request: any S in [low, high]; the scheduler picks the largest its queue can serve in time."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"need 1 <= samples_min <= samples_max, got {self.low} and {self.high}")


class Ticket:
    """One admitted request: its images' jobs, its deadline, and how far it has got."""

    def __init__(self, request_id: int, jobs: Sequence[ImageJob], admitted_at: float, deadline: float | None,
                 requested_crops: int) -> None:
        self.id = request_id
        self.jobs = list(jobs)
        self.crops = sum(len(job.views) for job in jobs)
        self.requested_crops = requested_crops  # before an auto-S request was shrunk: the load it brought
        self.admitted_at = admitted_at
        self.deadline = deadline
        self.first_batched_at: float | None = None
        self.abandoned: str | None = None  # "deadline" or "client_gone", once
        self._cursor = 0

    @property
    def unhanded(self) -> int:
        """Crops not yet handed to a batch."""
        return sum(job.pending for job in self.jobs[self._cursor :])

    @property
    def uncomputed(self) -> int:
        """Crops whose embeddings have not been added yet (queued or in a batch in flight)."""
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


@dataclass
class Batch:
    """Crops from one or more requests that go through the model together."""

    chunks: list[Chunk]
    members: list[Ticket]
    formed_at: float
    crops: int = field(init=False)

    def __post_init__(self) -> None:
        self.crops = sum(len(chunk.views) for chunk in self.chunks)


Clock = Callable[[], float]
AUTO_DEADLINE_SHARE = 0.5  # of its deadline, what an auto-S request's estimated wait may use (auto_samples)
AUTO_FLOOR_DEADLINE_SHARE = 0.6  # the same for its smallest S, before it is refused (see auto_samples)


class Scheduler:
    def __init__(self, config: BatchingConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.closed = False  # no new admissions (draining or stopped)
        # Seconds per crop through the slowest stage lately (the pipeline's pace); None before any batch ran.
        self.seconds_per_crop: float | None = None
        self.crops_dropped = 0
        self._ids = itertools.count(1)
        self._queue: collections.deque[Ticket] = collections.deque()  # with crops to hand out, in turn order
        self._running: dict[int, Ticket] = {}  # admitted, not yet settled or abandoned
        self._refused_until: list[float] = []  # a heap: for each request refused lately, when its Retry-After ends

    # ---- figures ---------------------------------------------------------------------------------
    @property
    def pending_requests(self) -> int:
        return len(self._running)

    @property
    def waiting_requests(self) -> int:
        """Requests with crops not yet handed to a batch."""
        return len(self._queue)

    @property
    def queued_crops(self) -> int:
        """Crops admitted and not yet computed (nor dropped)."""
        return sum(ticket.uncomputed for ticket in self._running.values())

    @property
    def requested_crops(self) -> int:
        """Like queued_crops, but counting auto-S requests at the S they asked for: shrinking S to serve more
        requests does not hide the load from an autoscaler."""
        return sum(ticket.uncomputed + ticket.requested_crops - ticket.crops for ticket in self._running.values())

    def wait_estimate_s(self) -> float:
        """How long the crops queued now take at the measured pace: the wait a new request would see
        before its last crop, at worst (0 when idle or before anything ran)."""
        return self._seconds_for(self.queued_crops, unknown=0.0)

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self._seconds_for(self.queued_crops, unknown=1.0)))

    def running(self, ticket: Ticket) -> bool:
        return ticket.id in self._running

    def tickets(self) -> list[Ticket]:
        return list(self._running.values())

    # ---- admission -------------------------------------------------------------------------------
    def auto_samples(self, images: int, samples_range: SamplesRange, timeout_s: float | None = None) -> int:
        """An auto-S request's S: the largest in the range that fits its share of the wait target, the queue's
        room and, at the measured pace, `AUTO_DEADLINE_SHARE` of its deadline; else the smallest, if it fits the
        room and `AUTO_FLOOR_DEADLINE_SHARE`; else raises Overloaded. Changes nothing but the count of refusals;
        `admit` queues the request at that S.

        The share: with n requests queued (and refused lately: their clients come back after their Retry-After),
        S ≤ the target's crops / (n + 1), so that were every one of them run at this S, the queue would be done
        within the target. As the queue grows new auto requests get smaller S, and every client gets the same S,
        where judging by the crops queued alone lets whoever arrives at a momentarily emptier queue take all its
        room and keep it (the others refused, unseen). The deadline gets only a share: the pace is a moving
        average of a noisy figure, so an S that just fits the whole deadline often misses it (504)."""
        budget_s = None if timeout_s is None else timeout_s * AUTO_DEADLINE_SHARE
        share = self.config.auto_wait_crops / (self.pending_requests + self._refused_lately() + 1)
        for samples in range(min(samples_range.high, math.floor(share)), samples_range.low, -1):
            if self.refusal(samples * images, budget_s) is None:
                return samples
        # The floor gets a narrower margin: refusing it leaves the model idle while refused clients wait out a
        # Retry-After of whole seconds. Measured at 2x load (`bench.goals --parts auto`, docs/benchmarks.md):
        # share 0.5 gave 1.8x the images/s of fixed S=32 (224 of 431 refused), 0.6 gave 4.0x (97 of 565
        # refused, no 504), 0.75 gave 5.2x but 3 of 612 requests missed their deadline (504).
        floor_s = None if timeout_s is None else timeout_s * AUTO_FLOOR_DEADLINE_SHARE
        refusal = self.refusal(samples_range.low * images, floor_s)
        if refusal is not None:
            raise self._refused(refusal)
        return samples_range.low

    def admit(self, jobs: Sequence[ImageJob], *, timeout_s: float | None = None,
              requested_crops: int | None = None) -> Ticket:
        """Queue a request's jobs, or raise Overloaded/NotReady now. `requested_crops`: what an auto-S request
        asked for before `auto_samples` gave it its S (counted in `requested_crops`, for autoscaling); such a
        request keeps the margin its S was given with (`AUTO_FLOOR_DEADLINE_SHARE` of its deadline), as the
        queue may have grown while its images were planned: admitted against its whole deadline, 16 of 472 missed it
        (504) at 2x load (docs/benchmarks.md, "Auto S under overload")."""
        if self.closed:
            raise NotReady("the service is shutting down")
        crops = sum(len(job.views) for job in jobs)
        auto = requested_crops is not None
        may_wait_s = timeout_s * AUTO_FLOOR_DEADLINE_SHARE if auto and timeout_s is not None else timeout_s
        refusal = self.refusal(crops, may_wait_s)
        if refusal is not None:
            raise self._refused(refusal)
        now = self.clock()
        deadline = None if timeout_s is None else now + timeout_s
        ticket = Ticket(next(self._ids), jobs, now, deadline, max(crops, requested_crops or 0))
        self._queue.append(ticket)
        self._running[ticket.id] = ticket
        return ticket

    def admit_auto(self, jobs: Sequence[ImageJob], samples_range: SamplesRange, *,
                   timeout_s: float | None = None) -> Ticket:
        """Queue an auto-S request whose images were planned at the S `auto_samples` gave it before they decoded.
        It keeps that S if `admit` would take it; else (the queue grew meanwhile) its S is given again from the
        queue it joins, below the planned one, and its plans cut to it: plans are prefix-stable, the first S' views
        of an S plan are the S' plan.
        Refusing it for the S given before its decode turned away requests the queue still had room for at a
        smaller S (auto's images/s with deadlines fell 10-40 %, docs/benchmarks.md)."""
        planned = len(jobs[0].views)
        requested_crops = samples_range.high * len(jobs)
        may_wait_s = None if timeout_s is None else timeout_s * AUTO_FLOOR_DEADLINE_SHARE  # as `admit` judges it
        if self.closed or self.refusal(planned * len(jobs), may_wait_s) is None:
            return self.admit(jobs, timeout_s=timeout_s, requested_crops=requested_crops)  # its S still fits
        low = min(samples_range.low, planned)
        samples = self.auto_samples(len(jobs), SamplesRange(low, max(low, planned - 1)), timeout_s)
        for job in jobs:
            job.keep_first(samples)
        return self.admit(jobs, timeout_s=timeout_s, requested_crops=requested_crops)

    def refusal(self, crops: int, timeout_s: float | None) -> ServiceError | None:
        """Why a request of `crops` cannot be admitted now, or None if it can: 429 when the queue is the
        reason, 422 when its deadline is too short for its own crops even with nothing queued (no retry helps)."""
        if timeout_s is not None and self.seconds_per_crop is not None:
            alone_s = self._seconds_for(crops, unknown=0.0)
            if alone_s > timeout_s:
                return InvalidOption(
                    "the request's deadline (timeout_ms) is too short for it even on an idle server: its "
                    f"{crops} crops take about {alone_s:.2g} s at the measured pace, and its deadline leaves "
                    f"{timeout_s:.2g} s for them; "
                    "give a longer timeout_ms, or send fewer images or samples")
        queued = self.queued_crops
        retry = {"Retry-After": str(self.retry_after_s())}
        if queued + crops > self.config.max_queue_crops:
            return Overloaded(f"the queue is full ({queued} of {self.config.max_queue_crops} crops queued); "
                              "retry later", headers=retry)
        if timeout_s is not None and self.seconds_per_crop is not None:
            expected_s = self._seconds_for(self._crops_until_done(crops), unknown=0.0)
            if expected_s > timeout_s:
                return Overloaded(f"with {queued} crops queued, this request's {crops} crops would take about "
                                  f"{expected_s:.2g} s, past its deadline (it may wait {timeout_s:.2g} s); retry later",
                                  headers=retry)
        return None

    def check(self, crops: int, timeout_s: float | None) -> None:
        """Raise what `refusal` says for a request of `crops` (before its images are decoded), counted as
        a refusal for the auto-S share."""
        refusal = self.refusal(crops, timeout_s)
        if refusal is not None:
            raise self._refused(refusal)

    def _refused(self, refusal: ServiceError) -> ServiceError:
        """Remember an overload refusal until its Retry-After ends: the demand it stands for is coming back (a
        request refused for a deadline too short for its own crops is not: it has no Retry-After)."""
        if "Retry-After" in refusal.headers:
            heapq.heappush(self._refused_until, self.clock() + float(refusal.headers["Retry-After"]))
        self._refused_lately()  # forgotten as they expire, so a long flood of refusals holds no memory
        return refusal

    def _refused_lately(self) -> int:
        now = self.clock()
        while self._refused_until and self._refused_until[0] <= now:
            heapq.heappop(self._refused_until)
        return len(self._refused_until)

    def _crops_until_done(self, crops: int) -> int:
        """Crops computed before a new request of `crops` would finish: round-robin gives it a chunk per
        turn, so each request queued ahead gets as many turns, never more than it has left."""
        turns = -(-crops // self.config.chunk_crops)
        share = turns * self.config.chunk_crops
        return crops + sum(min(ticket.uncomputed, share) for ticket in self._running.values())

    def _seconds_for(self, crops: int, *, unknown: float) -> float:
        return unknown if self.seconds_per_crop is None else crops * self.seconds_per_crop

    # ---- leaving early: the one place for deadlines and disconnects -----------------------------
    def abandon(self, ticket: Ticket, reason: str) -> bool:
        """The client stopped waiting: forget the request now (its room is free at once, its crops not yet
        handed out never run). True if it was still running (then the caller reports it)."""
        if ticket.id not in self._running:
            return False
        ticket.abandoned = reason
        self.crops_dropped += ticket.unhanded
        self._forget(ticket)
        return True

    def expire(self) -> list[Ticket]:
        """Abandon every request whose deadline has passed; returns them (to be answered 504)."""
        now = self.clock()
        expired = [t for t in self._running.values() if t.deadline is not None and now >= t.deadline]
        for ticket in expired:
            self.abandon(ticket, "deadline")
        return expired

    def _forget(self, ticket: Ticket) -> None:
        self._running.pop(ticket.id, None)
        if ticket in self._queue:
            self._queue.remove(ticket)

    # ---- batches ---------------------------------------------------------------------------------
    def fill_wait_s(self) -> float:
        """How long to wait for a fuller batch before forming one: only while several requests are queued
        with fewer crops than a batch holds, and at most max_wait_ms after the oldest was admitted."""
        if self.config.max_wait_ms <= 0 or len(self._queue) < 2:
            return 0.0
        if sum(ticket.unhanded for ticket in self._queue) >= self.config.max_batch_crops:
            return 0.0
        oldest = min(ticket.admitted_at for ticket in self._queue)
        return max(0.0, oldest + self.config.max_wait_ms / 1000 - self.clock())

    def next_batch(self) -> Batch | None:
        """Form one batch round-robin from the queued requests; None when nothing is queued."""
        if not self._queue:
            return None
        room = self.config.max_batch_crops
        chunks: list[Chunk] = []
        members: list[Ticket] = []
        served: list[Ticket] = []
        while room > 0 and (self._queue or served):
            if not self._queue:
                # Every queued request had its turn and there is still room (a lone request, say):
                # another round, so a batch is never sent out part-empty while crops wait.
                self._queue.extend(served)
                served = []
            ticket = self._queue.popleft()
            taken = ticket.take(min(room, self.config.chunk_crops))
            room -= sum(len(chunk.views) for chunk in taken)
            chunks += taken
            if ticket not in members:
                members.append(ticket)
            if ticket.unhanded > 0:
                served.append(ticket)  # back of the line: round-robin
        self._queue.extend(served)
        now = self.clock()
        for ticket in members:
            if ticket.first_batched_at is None:
                ticket.first_batched_at = now
        return Batch(chunks, members, now)

    def finished(self, batch: Batch, stage_seconds: tuple[float, float, float], ran: int) -> list[Ticket]:
        """A batch's embeddings were added: learn the pace; returns its requests that are now complete
        (and forgets them; abandoned ones are not returned).

        `stage_seconds` (render, forward, reduce) and `ran`, the crops the forward computed: rendering handled
        every crop of the batch, the forward and reduce only those still wanted. The pace is the slowest stage
        per crop it handled; a batch whose requests were all abandoned after rendering teaches nothing."""
        if ran:
            render_s, forward_s, reduce_s = stage_seconds
            per_crop = max(render_s / batch.crops, forward_s / ran, reduce_s / ran)
            previous = self.seconds_per_crop
            # A short memory (the last ~10 batches): the pace changes with S, image sizes and machine load.
            self.seconds_per_crop = per_crop if previous is None else 0.9 * previous + 0.1 * per_crop
        complete = [t for t in batch.members if t.id in self._running and t.done()]
        for ticket in complete:
            self._forget(ticket)
        return complete

    def failed(self, batch: Batch) -> list[Ticket]:
        """A batch failed: its requests (still running) fail with it; returns them."""
        members = [t for t in batch.members if t.id in self._running]
        for ticket in members:
            self._forget(ticket)
        return members

    def fail_all(self) -> list[Ticket]:
        """Everything admitted and unsettled (the worker stopped); returns it."""
        tickets = list(self._running.values())
        for ticket in tickets:
            self._forget(ticket)
        return tickets
