"""The queue figures' time integrals, driven by hand: a clock the test moves, the scheduler without threads."""

from __future__ import annotations

import pytest

from models import create_model
from service.engine.integral import TimeIntegral
from tests.unit.test_scheduler import Clock, complete, jobs, scheduler


@pytest.fixture(scope="module")
def dummy():
    return create_model("dummy")


def test_a_piecewise_constant_figure_integrates_exactly_and_the_open_piece_counts_up_to_now() -> None:
    clock, figure = Clock(), [3.0]
    integral = TimeIntegral(lambda: figure[0], clock)
    clock.now += 2.0
    assert integral.total() == pytest.approx(6.0)  # 3 × 2 s, the piece still open
    figure[0] = 5.0
    integral.changed()
    clock.now += 0.5
    figure[0] = 0.0
    integral.changed()
    clock.now += 10.0
    assert integral.total() == pytest.approx(6.0 + 2.5)  # nothing more while the figure is 0


def test_the_scheduler_figures_between_its_events(dummy) -> None:
    clock = Clock()
    s = scheduler(clock, max_batch_crops=8, chunk_crops=8)
    crops = TimeIntegral(lambda: s.requested_crops, clock)
    wait = TimeIntegral(s.wait_estimate_s, clock)

    def event() -> None:  # what the engine does under its lock after each scheduler call
        crops.changed()
        wait.changed()

    first = s.admit(jobs(dummy, 8))
    event()
    clock.now += 2.0  # 8 crops for 2 s; no pace measured yet, so no wait estimate
    s.admit(jobs(dummy, 4))
    event()
    clock.now += 1.0  # 12 crops for 1 s
    batch = s.next_batch()  # the batch is formed: its crops are still uncomputed
    assert batch is not None and batch.members == [first]
    event()
    clock.now += 0.5  # 12 crops for 0.5 s
    assert complete(s, batch, seconds=0.08) == [first]  # pace: 0.01 s a crop
    event()
    clock.now += 3.0  # 4 crops for 3 s, each worth 0.01 s of wait
    second = s.tickets()[0]
    s.abandon(second, "client_gone")
    event()
    clock.now += 5.0  # idle

    assert crops.total() == pytest.approx(8 * 2.0 + 12 * 1.0 + 12 * 0.5 + 4 * 3.0)
    assert wait.total() == pytest.approx(4 * 0.01 * 3.0)
