"""A real Prometheus (Debian's binary) with this repository's config and rules, scraping one loopback target.

The config is docker/prometheus/prometheus.yml with only what a test must change: the target (a free
loopback port instead of the compose service name) and the scrape/evaluation interval.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from service.testing import free_port
from tests.e2e.deploy import PROMETHEUS_DIR, find_tool


@contextmanager
def run_prometheus(workdir: Path, target_url: str, interval: str = "1s") -> Iterator[str]:
    """Start Prometheus scraping `target_url` every `interval`; yields its URL once ready; stops it by PID."""
    binary = find_tool("prometheus")
    for rules in ("recording_rules.yml", "alert_rules.yml"):
        shutil.copy(PROMETHEUS_DIR / rules, workdir / rules)
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    # Only the service's job, pointed at the live server (the self-scrape job is not under test).
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] == "metta-serve"]
    assert len(config["scrape_configs"]) == 1
    config["scrape_configs"][0]["static_configs"] = [{"targets": [target_url.removeprefix("http://")]}]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"prometheus exited {process.returncode}\n{log_path.read_text()}"
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready\n{log_path.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def query(prometheus: str, promql: str, at: float | None = None) -> list[dict[str, Any]]:
    """An instant query (now, or at the Unix time `at`); the result vector."""
    params = {"query": promql} if at is None else {"query": promql, "time": f"{at:.3f}"}
    reply = httpx.get(f"{prometheus}/api/v1/query", params=params, timeout=10)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result
