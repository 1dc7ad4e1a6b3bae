"""The engine keeps the queue figures' time integrals at its events, and /metrics serves them as counters."""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ControlledModel, engine_of, png_bytes, serve

pytestmark = pytest.mark.anyio

CROPS = "metta_queue_crops_seconds_total"
WAIT = "metta_queue_wait_estimate_seconds_seconds_total"


@dataclass
class Reading:
    before: float  # time.monotonic() (the engine's clock) just before the scrape and just after it
    after: float
    crops: float
    wait: float


async def read(client: httpx.AsyncClient) -> Reading:
    before = time.monotonic()
    text = (await client.get("/metrics")).text
    after = time.monotonic()
    values = {sample.name: sample.value for family in text_string_to_metric_families(text)
              for sample in family.samples}
    return Reading(before, after, values[CROPS], values[WAIT])


def assert_rate(start: Reading, end: Reading, name: str, per_second: float) -> None:
    """The integral grew at `per_second` between the readings: bounded by the scrapes' own time spans."""
    grown = getattr(end, name) - getattr(start, name)
    assert per_second * (end.before - start.after) - 1e-9 <= grown <= per_second * (end.after - start.before) + 1e-9


async def test_the_integrals_grow_at_the_queue_figures_while_work_waits_and_stop_when_it_is_done() -> None:
    spy = ControlledModel()
    body = {"images": [base64.b64encode(png_bytes(1)).decode()], "samples": 4, "seed": 7}
    async with serve(model=spy.loaded(), max_batch_crops=8, chunk_crops=8) as client:
        engine = engine_of(client)
        assert (await client.post("/v1/embeddings", json=body)).status_code == 200  # a pace is measured
        idle = await read(client)
        await asyncio.sleep(0.2)
        assert_rate(idle, await read(client), "crops", 0.0)

        spy.gate.clear()  # hold the forward: 4 crops stay queued (in a batch, not computed)
        spy.entered.clear()
        held = asyncio.create_task(client.post("/v1/embeddings", json=body))
        while not spy.entered.is_set():
            await asyncio.sleep(0.005)
        pace = engine.scheduler.seconds_per_crop  # fixed while nothing finishes
        assert pace is not None and pace > 0
        start = await read(client)
        await asyncio.sleep(0.3)
        end = await read(client)
        assert_rate(start, end, "crops", 4.0)
        assert_rate(start, end, "wait", 4 * pace)

        spy.gate.set()
        assert (await held).status_code == 200
        done = await read(client)  # the finished batch closed the 4-crop piece: nothing accrues now
        await asyncio.sleep(0.2)
        later = await read(client)
        assert_rate(done, later, "crops", 0.0)
        assert_rate(done, later, "wait", 0.0)
