"""The autoscaling signal, read back through a real Prometheus, follows the engine's own time-averages.

metta-serve runs the `sleep:<µs>` test model: its forward waits a fixed time per crop with the GIL
released, so the capacity is known whatever else the machine does. 8 ms a crop (125 crops/s), not
2 ms: rendering the views still costs CPU, and on the 2-core CI machine the renderer tops out near
400 crops/s with the load generator beside it, so 500 crops/s would not be the model's limit but the
machine's. Open-loop Poisson arrivals of S=8 requests at 0.5×, 1× and 2× capacity, LEVEL_S seconds each;
Prometheus scrapes every 0.5 s. Over each level's window, `avg_over_time(gauge[w])` (what an HPA or
KEDA reads) must match `increase(integral[w]) / w` (the engine's exact time-average, from its own
bookkeeping) within 10 %, plus one request's worth near zero, where the gauge's few samples of a
queue that is mostly empty are all the error there is.
"""

from __future__ import annotations

import asyncio
import collections
import io
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from PIL import Image

from service.testing import ServerProcess, start_server
from tests.e2e.prometheus import query, run_prometheus

MICROSECONDS_PER_CROP = 8000
CAPACITY = 1e6 / MICROSECONDS_PER_CROP  # crops/s
SAMPLES = 8
LOADS = (0.5, 1.0, 2.0)  # × capacity
LEVEL_S = 16.0
MAX_QUEUE_CROPS = 512  # about 4 s of work: at 2× the queue reaches its bound (then 429) within the level
# gauge → (its integral, the absolute tolerance: one request's crops, one request's time)
FIGURES = {
    "metta_queue_crops": ("metta_queue_crops_seconds_total", SAMPLES),
    "metta_queue_wait_estimate_seconds": ("metta_queue_wait_estimate_seconds_seconds_total", SAMPLES / CAPACITY),
}


@dataclass
class Level:
    load: float
    start: float = 0.0  # Unix time, as Prometheus keeps it
    end: float = 0.0
    codes: collections.Counter[str] = field(default_factory=collections.Counter)


@pytest.fixture(scope="module")
def sleep_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("server"), "--model", f"sleep:{MICROSECONDS_PER_CROP}",
                          "--device", "cpu", "--max-queue-crops", str(MAX_QUEUE_CROPS), "--max-request-crops", "64")
    yield server
    assert server.terminate() == 0, server.log()


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 90, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


async def drive(url: str, levels: list[Level]) -> None:
    """Open loop: each level's requests are sent on a seeded Poisson schedule, whatever the replies do."""
    rng = random.Random(12)
    image = png()
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Task[None]] = set()

    async def send(client: httpx.AsyncClient, codes: collections.Counter[str]) -> None:
        try:
            reply = await client.post("/v1/embeddings", files=[("images", ("x.png", image, "image/png"))],
                                      data={"samples": str(SAMPLES), "policy": "multiscale", "seed": "1"})
            codes[str(reply.status_code)] += 1
        except httpx.TransportError as exc:
            codes[type(exc).__name__] += 1

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=None)) as client:
        for level in levels:
            rate = level.load * CAPACITY / SAMPLES  # requests/s
            level.start, begun = time.time(), loop.time()
            due = begun + rng.expovariate(rate)
            while due < begun + LEVEL_S:
                await asyncio.sleep(max(0.0, due - loop.time()))
                task = asyncio.create_task(send(client, level.codes))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                due += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, begun + LEVEL_S - loop.time()))
            level.end = time.time()
        await asyncio.gather(*in_flight)


def value(prometheus: str, promql: str, at: float) -> float:
    result = query(prometheus, promql, at)
    assert len(result) == 1, (promql, result)
    return float(result[0]["value"][1])


def test_prometheus_reads_the_queue_figures_the_engine_averaged(sleep_server: ServerProcess,
                                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    levels = [Level(load) for load in LOADS]
    with run_prometheus(tmp_path_factory.mktemp("prometheus"), sleep_server.url, interval="500ms") as prometheus:
        deadline = time.monotonic() + 30  # ready is not scraping yet: wait for the target's first samples
        while not query(prometheus, 'count_over_time(up{job="metta-serve"}[10s]) >= 3'):
            assert time.monotonic() < deadline, "prometheus did not scrape the server"
            time.sleep(0.2)
        asyncio.run(drive(sleep_server.url, levels))
        time.sleep(1.5)  # scrapes past the last window's end

        job = '{job="metta-serve"}'
        figures: dict[tuple[float, str], tuple[float, float]] = {}  # (load, gauge) → (Prometheus, engine)
        for level in levels:
            window = f"{round((level.end - level.start) * 1000)}ms"
            seconds = round((level.end - level.start) * 1000) / 1000
            served = value(prometheus, f"increase(metta_crops_total{job}[{window}]) / {seconds}", level.end)
            line = [f"{level.load:g}x: {sum(level.codes.values()) / seconds:.1f} req/s offered, "
                    f"{served:.0f} crops/s served, replies {dict(level.codes)}"]
            for gauge, (integral, _) in FIGURES.items():
                read_back = value(prometheus, f"avg_over_time({gauge}{job}[{window}])", level.end)
                own = value(prometheus, f"increase({integral}{job}[{window}]) / {seconds}", level.end)
                figures[level.load, gauge] = (read_back, own)
                line.append(f"{gauge}: avg_over_time {read_back:.4g}, engine {own:.4g}")
            print("; ".join(line))

    for level in levels:
        assert set(level.codes) <= {"200", "429"}, level.codes  # no 5xx, no connection errors
    assert "429" not in levels[0].codes and levels[-1].codes["429"] > 0  # below capacity, then over it
    for (load, gauge), (read_back, own) in figures.items():
        tolerance = 0.10 * own + FIGURES[gauge][1]
        assert abs(read_back - own) <= tolerance, f"{gauge} at {load:g}x: Prometheus {read_back}, engine {own}"
    for gauge in FIGURES:
        low, high = figures[LOADS[0], gauge], figures[LOADS[-1], gauge]
        assert low[0] < high[0] and low[1] < high[1], (gauge, low, high)  # the signal rises with the load
