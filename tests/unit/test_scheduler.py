"""The scheduler driven directly: no threads, no HTTP, a clock the test moves by hand."""

from __future__ import annotations

import itertools
import statistics
from typing import Any

import numpy as np
import pytest
import torch

from models import create_model
from service.core.embedding import EmbedOptions, ImageJob
from service.core.errors import InvalidOption, NotReady, Overloaded
from service.core.policies import make_policy
from service.engine.scheduler import BatchingConfig, SamplesRange, Scheduler


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def model():
    return create_model("dummy")


def jobs(model, samples: int, images: int = 1, seed: int = 0) -> list[ImageJob]:
    image = torch.zeros(3, 90, 120, dtype=torch.uint8)
    options = EmbedOptions(samples, make_policy("crop_flip"), seed)
    return [ImageJob(image, options, model) for _ in range(images)]


def scheduler(clock: Clock | None = None, **config: float) -> Scheduler:
    settings = {"max_batch_crops": 8, "chunk_crops": 4, "max_wait_ms": 0.0, "max_queue_crops": 64, **config}
    return Scheduler(BatchingConfig(**settings), clock or Clock())  # type: ignore[arg-type]


def complete(scheduler: Scheduler, batch, seconds: float = 0.08):
    """What the worker does after a forward: add (fake) embeddings, then report the batch done."""
    for chunk in batch.chunks:
        chunk.job.add(np.ones((len(chunk.views), chunk.job.stats.mean.shape[0])))
    return scheduler.finished(batch, (0.0, seconds, 0.0), batch.crops)


def test_batches_are_formed_round_robin_in_chunks(model) -> None:
    s = scheduler()
    big = s.admit(jobs(model, 32))
    small = s.admit(jobs(model, 4))
    batch = s.next_batch()
    assert batch is not None
    assert [len(c.views) for c in batch.chunks] == [4, 4]  # a chunk each, in turn
    assert batch.members == [big, small]
    assert complete(s, batch) == [small]  # the small one is done after one batch
    assert s.pending_requests == 1
    while (batch := s.next_batch()) is not None:
        assert batch.members == [big]
        finished = complete(s, batch)
    assert finished == [big] and s.pending_requests == 0 and s.queued_crops == 0


def test_a_lone_request_fills_the_whole_batch(model) -> None:
    s = scheduler()
    s.admit(jobs(model, 32))
    batch = s.next_batch()
    assert batch is not None and batch.crops == 8


def test_admission_is_bounded_in_crops_and_says_when_to_retry(model) -> None:
    s = scheduler(max_queue_crops=16)
    s.admit(jobs(model, 8, images=2))
    with pytest.raises(Overloaded) as refused:
        s.admit(jobs(model, 4))
    assert "queue is full" in refused.value.message and int(refused.value.headers["Retry-After"]) >= 1
    assert s.pending_requests == 1


def test_an_abandoned_request_frees_its_room_at_once(model) -> None:
    s = scheduler(max_queue_crops=16)
    first = s.admit(jobs(model, 16))
    with pytest.raises(Overloaded):
        s.admit(jobs(model, 8))
    assert s.abandon(first, "client_gone")
    assert not s.abandon(first, "client_gone")  # once
    assert s.queued_crops == 0 and s.crops_dropped == 16
    second = s.admit(jobs(model, 8))  # no batch had to run first
    batch = s.next_batch()
    assert batch is not None and batch.members == [second]


def test_an_abandoned_request_in_a_batch_in_flight_is_not_reported_done(model) -> None:
    s = scheduler()
    ticket = s.admit(jobs(model, 4))
    batch = s.next_batch()
    s.abandon(ticket, "client_gone")
    assert complete(s, batch) == []


def test_deadlines_expire_by_the_clock(model) -> None:
    clock = Clock()
    s = scheduler(clock)
    late = s.admit(jobs(model, 4), timeout_s=1.0)
    patient = s.admit(jobs(model, 4), timeout_s=10.0)
    clock.now += 0.5
    assert s.expire() == []
    clock.now += 0.6
    assert s.expire() == [late] and late.abandoned == "deadline"
    batch = s.next_batch()
    assert batch is not None and batch.members == [patient]


def test_admission_refuses_what_would_miss_its_deadline_counting_round_robin_turns(model) -> None:
    s = scheduler(max_queue_crops=1024)
    s.seconds_per_crop = 0.01
    s.admit(jobs(model, 250))  # 2.5 s of work ahead
    # A small request gets one turn per queued request: 4 + 4 crops ≈ 0.08 s, well within 1 s.
    s.admit(jobs(model, 4), timeout_s=1.0)
    with pytest.raises(Overloaded, match="deadline"):  # 0.9 s alone, but the queue's turns come first
        s.admit(jobs(model, 90), timeout_s=1.0)


def test_a_deadline_too_short_even_on_an_idle_server_is_the_requests_own_fault(model) -> None:
    """No retry can meet it, so it is not a 429 "retry later" but a 422 naming the deadline."""
    s = scheduler(max_queue_crops=1024)
    s.seconds_per_crop = 0.01
    with pytest.raises(InvalidOption, match=r"deadline \(timeout_ms\) is too short for it even on an idle server"):
        s.admit(jobs(model, 200), timeout_s=1.0)  # 2 s of its own crops, nothing queued
    with pytest.raises(InvalidOption, match="even on an idle server"):
        s.auto_samples(4, SamplesRange(8, 16), timeout_s=0.1)  # 32 crops at the least: 0.32 s
    s.admit(jobs(model, 90), timeout_s=1.0)  # alone it fits


def test_an_auto_request_is_admitted_with_the_margin_its_s_was_given_with(model) -> None:
    """Between the S given and the admission its images are planned and the queue may grow: it is admitted
    only if its wait still fits 0.6 of its deadline, where a fixed-S request may use all of it."""
    s = scheduler(max_queue_crops=4096, chunk_crops=8)
    s.seconds_per_crop = 0.01
    s.admit(jobs(model, 40))
    # 4 crops + one turn of 8 ahead = 0.12 s: within a 0.15 s deadline, not within 0.6 of it (0.09 s).
    with pytest.raises(Overloaded):
        s.admit(jobs(model, 4), timeout_s=0.15, requested_crops=32)
    s.admit(jobs(model, 4), timeout_s=0.15)
    s.admit(jobs(model, 4), timeout_s=0.3, requested_crops=32)  # 4 + 8 + 4 crops: 0.16 s ≤ 0.6 × 0.3 s


def test_the_pace_is_learned_from_finished_batches(model) -> None:
    s = scheduler()
    assert s.wait_estimate_s() == 0.0
    s.admit(jobs(model, 8))
    complete(s, s.next_batch(), seconds=0.08)  # 10 ms a crop
    assert s.seconds_per_crop == pytest.approx(0.01)
    s.admit(jobs(model, 16))
    assert s.wait_estimate_s() == pytest.approx(0.16)


def test_the_pace_counts_only_the_crops_a_stage_handled(model) -> None:
    """Abandoned after rendering: the render handled all 8 crops, the forward only the 4 still wanted. A batch
    nobody waits for any more teaches nothing (its render time is not one crop's cost)."""
    s = scheduler()
    s.admit(jobs(model, 8))
    batch = s.next_batch()
    assert batch is not None
    s.finished(batch, (0.04, 0.04, 0.0), ran=4)
    assert s.seconds_per_crop == pytest.approx(0.01)  # the forward: 0.04 s for 4 crops
    s.admit(jobs(model, 8))
    batch = s.next_batch()
    assert batch is not None
    s.finished(batch, (0.08, 0.0, 0.0), ran=0)
    assert s.seconds_per_crop == pytest.approx(0.01)


def test_a_fuller_batch_is_waited_for_only_while_several_requests_are_queued(model) -> None:
    clock = Clock()
    s = scheduler(clock, max_wait_ms=50.0)
    s.admit(jobs(model, 2))
    assert s.fill_wait_s() == 0.0  # a lone request never waits
    s.admit(jobs(model, 2))
    assert s.fill_wait_s() == pytest.approx(0.05)
    clock.now += 0.03
    assert s.fill_wait_s() == pytest.approx(0.02)
    s.admit(jobs(model, 4))
    assert s.fill_wait_s() == 0.0  # a full batch is there


def test_a_closed_scheduler_admits_nothing(model) -> None:
    s = scheduler()
    s.closed = True
    with pytest.raises(NotReady):
        s.admit(jobs(model, 1))


def test_auto_samples_take_the_largest_s_that_fits(model) -> None:
    s = scheduler(max_queue_crops=64)
    wide = SamplesRange(4, 32)
    assert s.auto_samples(1, wide) == 32
    s.admit(jobs(model, 32))
    assert s.auto_samples(2, wide) == 16  # 32 queued + 2 × 16 = 64
    s.admit(jobs(model, 16, images=2), requested_crops=64)  # an auto request given 16 of its 32
    assert s.requested_crops == 32 + 64 and s.queued_crops == 64  # the load asked for stays visible
    with pytest.raises(Overloaded):
        s.auto_samples(1, wide)


def test_auto_samples_shrink_to_meet_the_deadline(model) -> None:
    s = scheduler(max_queue_crops=4096, chunk_crops=8)
    s.seconds_per_crop = 0.01
    s.admit(jobs(model, 40))  # 0.4 s ahead in turns of 8
    # S crops of its own + min(40, S rounded up to turns of 8) ahead must fit in half of 1 s: S = 24 (24 + 24).
    assert s.auto_samples(1, SamplesRange(4, 32), timeout_s=1.0) == 24


def test_an_auto_request_gets_its_s_again_from_the_queue_it_joins(model) -> None:
    """S is given before the images decode (their reduced decode depends on it); if the queue grew meanwhile,
    the request joins at the S that fits now, its plans cut to that S's plan, instead of a 429."""
    s = scheduler(max_queue_crops=4096, chunk_crops=8)
    s.seconds_per_crop = 0.01
    planned = s.auto_samples(1, SamplesRange(4, 32), timeout_s=1.0)
    assert planned == 32
    late = jobs(model, planned)
    s.admit(jobs(model, 40))  # admitted while `late` decoded: 0.4 s ahead in turns of 8
    ticket = s.admit_auto(late, SamplesRange(4, 32), timeout_s=1.0)
    assert len(late[0].views) == 24  # as test_auto_samples_shrink_to_meet_the_deadline
    assert late[0].views == jobs(model, 24)[0].views  # the S=24 plan: the same seed's first 24 views
    assert ticket.requested_crops == 32 and s.queued_crops == 40 + 24
    with pytest.raises(Overloaded):  # refused only when even samples_min does not fit
        s.admit_auto(jobs(model, 32), SamplesRange(4, 32), timeout_s=0.1)
    # An S that `admit` takes as planned is kept, though a new request would now be given less.
    s = scheduler(max_queue_crops=4096, chunk_crops=8)
    s.seconds_per_crop = 0.01
    s.admit(jobs(model, 40))
    kept = jobs(model, 28)  # 28 + 32 ahead = 0.6 s: within 0.6 of 1 s, over its half
    s.admit_auto(kept, SamplesRange(4, 32), timeout_s=1.0)
    assert len(kept[0].views) == 28 and s.auto_samples(1, SamplesRange(4, 32), timeout_s=1.0) < 28


def test_auto_samples_judge_the_smallest_s_with_a_narrower_margin(model) -> None:
    s = scheduler(max_queue_crops=4096, chunk_crops=8)
    s.seconds_per_crop = 0.01
    s.admit(jobs(model, 40))
    # S=4: 4 crops + one turn of 8 ahead = 0.12 s: over half of a 0.2 s deadline, within 0.6 of it.
    assert s.auto_samples(1, SamplesRange(4, 32), timeout_s=0.2) == 4
    with pytest.raises(Overloaded, match=r"would take about 0\.12 s, past its deadline \(it may wait 0\.11 s\)"):
        s.auto_samples(1, SamplesRange(4, 32), timeout_s=0.19)  # 0.12 s > 0.6 × 0.19 s


def test_auto_samples_shrink_as_the_queue_grows_without_a_deadline(model) -> None:
    """No deadline at all: the wait target (8 batches of 8 = 64 crops here) is shared by the requests queued,
    so each new auto request gets a smaller S, down to samples_min, refused only when that does not fit."""
    s = scheduler(max_queue_crops=256)
    wide = SamplesRange(4, 32)
    given = []
    for _ in range(40):
        try:
            samples = s.auto_samples(1, wide)
        except Overloaded:
            break
        s.admit(jobs(model, samples), requested_crops=32)
        given.append(samples)
    assert given[:8] == [32, 32, 21, 16, 12, 10, 9, 8]  # 64 / (n + 1) with n queued
    assert given[-1] == 4 and given == sorted(given, reverse=True)
    assert s.queued_crops == 255  # refused only once not even 4 crops fit the queue's room
    assert s.requested_crops == 32 * len(given)  # the queue's figures keep counting what was asked for
    s.admit(jobs(model, 1))  # a fixed-S request is judged by the room alone, as before


def test_requests_refused_lately_count_in_the_share_until_their_retry_after(model) -> None:
    """A refused client comes back after its Retry-After: until then it still counts as demand, so the next
    arrival does not take the whole room that frees up."""
    clock = Clock()
    s = scheduler(clock, max_queue_crops=64)
    s.seconds_per_crop = 0.01  # Retry-After: 1 s
    s.admit(jobs(model, 32))
    s.admit(jobs(model, 32))
    with pytest.raises(Overloaded):
        s.auto_samples(1, SamplesRange(4, 32))  # the queue is full
    with pytest.raises(Overloaded):
        s.check(4, None)
    while (batch := s.next_batch()) is not None:
        complete(s, batch)
    assert s.auto_samples(1, SamplesRange(4, 32)) == 21  # 64 / (2 refused + 1), on an empty queue
    clock.now += 1.0
    assert s.auto_samples(1, SamplesRange(4, 32)) == 32  # their Retry-After has passed


def test_fixed_s_requests_are_not_shrunk_by_the_auto_share(model) -> None:
    s = scheduler(max_queue_crops=256)
    for _ in range(7):
        s.admit(jobs(model, 32))
    assert s.auto_samples(1, SamplesRange(4, 32)) == 8  # 64 / 8
    s.check(32, None)
    assert len(s.admit(jobs(model, 32)).jobs[0].views) == 32


def closed_loop(model, clients: int, seconds: float, *, pace_s: float | None = None,
                fixed: int | None = None, crops_per_s: float = 100.0, warmup_s: float = 5.0) -> tuple[list[int], int]:
    """Clients in a closed loop through the scheduler on a simulated clock: each sends one image (decoded in
    20 ms), waits for its reply, and sends the next at once (or `pace_s` after the last), after a refusal
    only once its Retry-After is over; the model computes `crops_per_s`. Returns the S of every reply and
    the number of refusals, both counted after `warmup_s` (at the start every client arrives at once, before
    the scheduler has seen how many there are)."""
    import heapq

    clock = Clock()
    s = Scheduler(BatchingConfig(32, 16, 0.0, 256), clock)  # the CPU's batching, a 256-crop queue
    events: list[tuple[float, int, str, Any]] = []
    order = itertools.count()
    owner: dict[int, tuple[int, float]] = {}
    served: list[int] = []
    refused = 0
    busy = False

    def at(when: float, kind: str, what: Any) -> None:
        heapq.heappush(events, (when, next(order), kind, what))

    for client in range(clients):
        at(clock.now + client * (pace_s / clients if pace_s else 0.001), "send", client)
    start = clock.now
    end = start + seconds
    while events and events[0][0] < end:
        clock.now, _, kind, what = heapq.heappop(events)
        if kind == "send":
            at(clock.now + 0.02, "decoded", (what, clock.now))
        elif kind == "decoded":
            client, sent = what
            try:
                samples = fixed or s.auto_samples(1, SamplesRange(4, 32), 60.0)
                ticket = s.admit(jobs(model, samples), timeout_s=60.0, requested_crops=None if fixed else 32)
                owner[ticket.id] = (client, sent)
            except Overloaded as refusal:
                refused += clock.now >= start + warmup_s
                at(clock.now + float(refusal.headers["Retry-After"]), "send", client)
        else:
            busy = False
            for ticket in complete(s, what, seconds=what.crops / crops_per_s):
                client, sent = owner.pop(ticket.id)
                if clock.now >= start + warmup_s:
                    served.append(len(ticket.jobs[0].views))
                at(max(clock.now + 0.01, sent + (pace_s or 0.0)), "send", client)
        if not busy and (batch := s.next_batch()) is not None:
            busy = True
            at(clock.now + batch.crops / crops_per_s, "batch", batch)
    return served, refused


def test_auto_s_in_a_closed_loop_past_capacity_serves_more_at_a_fair_s(model) -> None:
    """32 clients without deadlines against a 256-crop queue: fixed S=32 leaves most of them refused; auto
    [4, 32] serves every client at about S=8, few refused. At half capacity (8 clients pacing themselves)
    every auto request runs at S=32."""
    fixed, fixed_refused = closed_loop(model, 32, 30.0, fixed=32)
    auto, auto_refused = closed_loop(model, 32, 30.0)
    assert len(auto) >= 2 * len(fixed)
    assert auto_refused < 0.1 * (len(auto) + auto_refused) < fixed_refused
    assert statistics.median(auto) >= 8
    half, half_refused = closed_loop(model, 8, 30.0, pace_s=8 * 32 / 100 / 0.5)
    assert half_refused == 0 and set(half) == {32}
