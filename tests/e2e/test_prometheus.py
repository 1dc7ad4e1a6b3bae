"""A real Prometheus, with this repository's config and rules (1 s intervals), scraping a live metta-serve."""

from __future__ import annotations

import io
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from service.testing import ServerProcess
from tests.e2e.deploy import recording_rule_names
from tests.e2e.prometheus import query, run_prometheus

SAMPLES_SENT = (1, 4, 16)
P95 = "samples:metta_request_duration_seconds:p95_1m"


@pytest.fixture(scope="module")
def prometheus(dummy_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_prometheus(tmp_path_factory.mktemp("prometheus"), dummy_server.url) as url:
        yield url


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (120, 90), (seed * 40 % 256, 90, 200 - seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_p95_latency_by_samples_through_the_recording_rule(dummy_server: ServerProcess, prometheus: str) -> None:
    # Requests spread over several scrapes: a rate needs an increase between two scrapes of a series.
    deadline = time.monotonic() + 8
    sent = 0
    while time.monotonic() < deadline or sent < 3 * len(SAMPLES_SENT):
        for samples in SAMPLES_SENT:
            reply = httpx.post(f"{dummy_server.url}/v1/embeddings",
                               files=[("images", ("x.png", png(sent), "image/png"))],
                               data={"samples": str(samples), "policy": "crop_flip", "seed": str(sent)}, timeout=60)
            assert reply.status_code == 200, reply.text
            sent += 1
        time.sleep(0.3)

    result: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = query(prometheus, P95)
        values = [float(series["value"][1]) for series in result]
        if len(result) == len(SAMPLES_SENT) and all(math.isfinite(v) for v in values):
            break
        time.sleep(1)

    # Exactly one series per S sent, labelled by the service's S bucket, with a real latency.
    labels = sorted(series["metric"]["samples"] for series in result)
    assert labels == sorted(str(s) for s in SAMPLES_SENT), result
    assert all(series["metric"]["job"] == "metta-serve" for series in result)
    for series in result:
        value = float(series["value"][1])
        assert math.isfinite(value) and 0 < value < 60, series

    # The other recorded throughput series see the same traffic.
    crops = query(prometheus, "job:metta_crops:rate1m")
    assert len(crops) == 1 and float(crops[0]["value"][1]) > 0


def test_target_is_up_and_every_rule_evaluates(dummy_server: ServerProcess, prometheus: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        up = query(prometheus, 'up{job="metta-serve"}')
        if up and up[0]["value"][1] == "1":
            break
        assert time.monotonic() < deadline, up
        time.sleep(0.5)
    assert query(prometheus, "metta_ready")[0]["value"][1] == "1"

    time.sleep(2)  # at least one evaluation of every group after the scrapes above
    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = [rule for group in rules for rule in group["rules"]]
    recorded = {rule["name"] for rule in loaded if rule["type"] == "recording"}
    assert recorded == recording_rule_names()
    assert {rule["name"] for rule in loaded if rule["type"] == "alerting"} >= {
        "MettaHighLatencyP95", "MettaOverloaded", "MettaQueueNearBound", "MettaDown", "MettaNotReady"}
    broken = [(rule["name"], rule.get("lastError")) for rule in loaded if rule["health"] == "err"]
    assert broken == []
    # A healthy, idle service: nothing fires.
    alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    assert [a for a in alerts if a["state"] == "firing"] == []
