"""Scale-out on one machine: metta-serve replicas on loopback behind a real HAProxy (Debian's), which the
test starts with its own config. Opt-in (`make lb-test` sets METTA_LB_TEST=1) so `make test` does not run
it a second time; CI runs `make lb-test`.

HAProxy balances every request (`option http-server-close`: one request per server connection), checks
`GET /readyz` on each replica, and retries only when a connection could not be made
(`retry-on conn-failure`, redispatched to another replica), never on a 5xx or an empty reply: a request
that reached a replica is answered by that replica or fails.

(a) split: two replicas, CLIENTS client threads at S=SAMPLES: each replica serves 40-60 % of the requests.
(b) rolling update: a third replica starts; once HAProxy reports it UP, an old one gets SIGTERM while at
    least 4 of its requests are in flight. No request may fail, and the old replica must exit 0.
(c) SIGKILL of a replica under load: the requests it had in flight fail; report how many, and the time
    until every request succeeds again.
The figures (split, retries, failures, recovery) go to $METTA_LB_OUT/lb_test.json when set.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from service.testing import ServerProcess, free_port, start_server
from tests.e2e.deploy import find_tool

# The test model, one place to switch: `sleep:1000` waits 1 ms per crop with the GIL released and costs
# no CPU, so the figures do not depend on what else the machine runs (`dummy --random-weights` also works).
MODEL_ARGS = ("--model", "sleep:1000", "--device", "cpu")
# SIGTERM: /readyz 503 at once, port open 1 s more (HAProxy checks every HEALTH_INTERVAL_MS), then drain.
SERVER_ARGS = (*MODEL_ARGS, "--shutdown-delay-s", "1", "--log-level", "warning")
SAMPLES = 8
CLIENTS = 12           # >= 8; 12 over three replicas keeps >= 4 in flight on the one that gets SIGTERM
MIN_ROLLING = 500      # requests through the rolling update, all of which must succeed
PHASE_LIMIT_S = 120    # every load loop is bounded in time ...
MAX_REQUESTS = 20_000  # ... and in count
HEALTH_INTERVAL_MS = 200

pytestmark = [
    pytest.mark.skipif(os.environ.get("METTA_LB_TEST") != "1",
                       reason="opt-in: METTA_LB_TEST=1 (make lb-test) runs replicas behind HAProxy"),
    pytest.mark.timeout(900),
]


def log(message: str) -> None:
    print(f"[lb-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- HAProxy

HAPROXY_CONFIG = """\
global
    maxconn 512
    stats socket {socket} mode 600 level admin

defaults
    mode http
    timeout connect 1s
    timeout client 120s
    timeout server 120s
    timeout check 1s
    # one request per server connection: every request is balanced, and a draining replica never
    # has an idle keep-alive connection closed under a request HAProxy is about to send
    option http-server-close
    # retry only when no connection could be made, on another replica; never on 5xx or empty replies
    retries 3
    retry-on conn-failure
    option redispatch 1

frontend metta
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    http-response set-header X-Served-By %[srv_name]
    default-server check inter {inter}ms fall 1 rise 1
{servers}
"""


class HAProxy:
    """Debian's haproxy in the foreground with its own config; stopped by its PID."""

    def __init__(self, workdir: Path, names: list[str]) -> None:
        self.socket = workdir / "haproxy.sock"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Placeholders: each replica is pointed at its port at run time (`set server ... addr`), so the
        # replicas can pick their own free ports. Disabled (maintenance) until then.
        servers = "\n".join(f"    server {name} 127.0.0.1:9 disabled" for name in names)
        config = workdir / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(socket=self.socket, port=self.port, inter=HEALTH_INTERVAL_MS,
                                                servers=servers))
        haproxy = find_tool("haproxy")
        check = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log_path = workdir / "haproxy.log"
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=out,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            assert self.process.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "haproxy did not open its stats socket"
            time.sleep(0.05)

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """`show stat` by server name (and BACKEND) for the replicas backend."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {row["svname"]: row for row in rows if row["pxname"] == "replicas"}

    def attach(self, name: str, server: ServerProcess) -> None:
        port = server.url.rsplit(":", 1)[1]
        for line in (f"set server replicas/{name} addr 127.0.0.1 port {port}",
                     f"set server replicas/{name} state ready"):
            reply = self.command(line)
            assert "error" not in reply.lower() and "unknown" not in reply.lower(), (line, reply)

    def wait_status(self, name: str, status: str, timeout: float = 30) -> float:
        """Seconds until HAProxy reports the server in `status`; UP counts only after a health check of
        /readyz passed (a server leaving maintenance is shown UP before its first check)."""
        started = time.monotonic()
        while True:
            row = self.stats()[name]
            if row["status"] == status and (status != "UP" or row["check_status"] == "L7OK"):
                return time.monotonic() - started
            assert time.monotonic() - started < timeout, f"{name} is {row['status']}, not {status}, after {timeout} s"
            time.sleep(0.01)

    def retries(self) -> dict[str, int]:
        backend = self.stats()["BACKEND"]
        return {"retries": int(backend["wretr"] or 0), "redispatches": int(backend["wredis"] or 0)}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# ---------------------------------------------------------------------------------------------- load

def request_body(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (seed % 256, 90, 160)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    return json.dumps({"images": [image], "samples": SAMPLES, "seed": seed}).encode()


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | None  # None: no HTTP reply (connection error, timeout)
    served_by: str
    error: str = ""


@dataclass
class Load:
    """CLIENTS threads, each with a keep-alive connection to HAProxy, sending requests back to back
    until stopped, at most MAX_REQUESTS in all and PHASE_LIMIT_S seconds per phase."""

    url: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.stop_event.clear()
        self.deadline = time.monotonic() + PHASE_LIMIT_S
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for thread in self.threads:
            thread.start()

    def stop(self) -> list[Outcome]:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(130)
            assert not thread.is_alive(), "a client thread did not stop"
        with self.lock:
            outcomes, self.outcomes = self.outcomes, []
        return outcomes

    def count(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def _client(self, index: int) -> None:
        headers = {"content-type": "application/json"}
        with httpx.Client(base_url=self.url, timeout=60) as client:
            seed = index * MAX_REQUESTS
            while not self.stop_event.is_set() and time.monotonic() < self.deadline and self.count() < MAX_REQUESTS:
                seed += 1
                started = time.monotonic()
                try:
                    reply = client.post("/v1/embeddings", content=request_body(seed), headers=headers)
                    outcome = Outcome(started, time.monotonic(), reply.status_code,
                                      reply.headers.get("x-served-by", ""),
                                      "" if reply.status_code == 200 else reply.text[:200])
                except httpx.HTTPError as exc:
                    outcome = Outcome(started, time.monotonic(), None, "", repr(exc))
                with self.lock:
                    self.outcomes.append(outcome)


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status != 200]


def split(outcomes: list[Outcome]) -> dict[str, float]:
    served = [o.served_by for o in outcomes if o.status == 200]
    return {name: served.count(name) / len(served) for name in sorted(set(served))}


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------- the test

@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[HAProxy, dict[str, ServerProcess]]]:
    haproxy = HAProxy(tmp_path, ["r1", "r2", "r3"])
    replicas: dict[str, ServerProcess] = {}
    try:
        for name in ("r1", "r2"):
            replicas[name] = start_server(tmp_path, *SERVER_ARGS)
            haproxy.attach(name, replicas[name])
        for name in ("r1", "r2"):
            haproxy.wait_status(name, "UP")
        yield haproxy, replicas
    finally:
        for replica in replicas.values():
            if replica.process.poll() is None:
                replica.process.kill()  # by PID; only the replicas this test started
                replica.process.wait(10)
            replica.log_file.close()
        haproxy.stop()


def test_split_rolling_update_and_kill(cluster: tuple[HAProxy, dict[str, ServerProcess]], tmp_path: Path) -> None:
    haproxy, replicas = cluster
    report: dict[str, Any] = {"clients": CLIENTS, "samples": SAMPLES, "model_args": list(MODEL_ARGS),
                              "server_args": list(SERVER_ARGS), "health_check_interval_ms": HEALTH_INTERVAL_MS}
    load = Load(haproxy.url)

    # (a) the split before any signal
    before = haproxy.retries()
    load.start()
    wait_for(lambda: load.count() >= 400, PHASE_LIMIT_S, "400 requests")
    outcomes = load.stop()
    shares = split(outcomes)
    report["split"] = {"requests": len(outcomes), "failed": len(failures(outcomes)), "share": shares,
                       **{k: v - before[k] for k, v in haproxy.retries().items()}}
    log(f"split: {report['split']}")
    assert failures(outcomes) == []
    assert set(shares) == {"r1", "r2"}
    assert all(0.4 <= share <= 0.6 for share in shares.values()), shares

    # (b) rolling update: r3 joins, r1 leaves with requests in flight
    before = haproxy.retries()
    load.start()
    started = time.monotonic()
    replicas["r3"] = start_server(tmp_path, *SERVER_ARGS)
    haproxy.attach("r3", replicas["r3"])
    up_after = haproxy.wait_status("r3", "UP")
    log(f"r3 ready and UP {time.monotonic() - started:.1f} s after its start (UP {up_after:.2f} s after attach)")
    wait_for(lambda: any(o.served_by == "r3" for o in load.outcomes[-50:]), 30, "r3 to serve")
    inflight_at_term = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        inflight_at_term = int(haproxy.stats()["r1"]["scur"] or 0)
        if inflight_at_term >= 4:
            break
    assert inflight_at_term >= 4, "r1 never had 4 requests in flight"
    term_at = time.monotonic()
    replicas["r1"].process.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    readyz_after_term = httpx.get(f"{replicas['r1'].url}/readyz", timeout=5).status_code
    down_after_term = haproxy.wait_status("r1", "DOWN", timeout=10)
    exit_code = replicas["r1"].process.wait(120)
    drained_in = time.monotonic() - term_at
    wait_for(lambda: load.count() >= MIN_ROLLING and time.monotonic() > term_at + 2, PHASE_LIMIT_S,
             f"{MIN_ROLLING} requests")
    outcomes = load.stop()
    answered_during_drain = [o for o in outcomes if o.served_by == "r1" and o.started < term_at < o.ended]
    report["rolling_update"] = {
        "requests": len(outcomes), "failed": len(failures(outcomes)), "share": split(outcomes),
        "r1_in_flight_at_sigterm": inflight_at_term, "r1_answered_after_sigterm": len(answered_during_drain),
        "r1_readyz_50ms_after_sigterm": readyz_after_term, "r1_marked_down_after_s": round(down_after_term, 3),
        "r1_exit_code": exit_code, "r1_exited_after_s": round(drained_in, 3),
        **{k: v - before[k] for k, v in haproxy.retries().items()}}
    log(f"rolling update: {report['rolling_update']}")
    assert [(o.status, o.served_by, o.error) for o in failures(outcomes)] == []
    assert len(outcomes) >= MIN_ROLLING
    assert exit_code == 0, replicas["r1"].log()
    assert readyz_after_term == 503, "not ready at once on SIGTERM, while still serving"
    assert len(answered_during_drain) >= 4, "the requests in flight at SIGTERM were answered by r1"

    # (c) SIGKILL r2 under load: r3 takes over
    before = haproxy.retries()
    load.start()
    wait_for(lambda: load.count() >= 100, PHASE_LIMIT_S, "100 requests")
    kill_at = time.monotonic()
    replicas["r2"].process.kill()
    replicas["r2"].process.wait(10)
    down_after = haproxy.wait_status("r2", "DOWN")
    wait_for(lambda: load.count() >= 400, PHASE_LIMIT_S, "400 requests")
    outcomes = load.stop()
    failed = failures(outcomes)
    last_failure = max((o.ended for o in failed), default=kill_at)
    after_kill = [o for o in outcomes if o.started > last_failure]
    report["sigkill"] = {
        "requests": len(outcomes), "failed": len(failed),
        "failed_statuses": sorted({str(o.status) for o in failed}),
        "recovery_s": round(last_failure - kill_at, 3), "marked_down_after_s": round(down_after, 3),
        "succeeded_after_last_failure": len(after_kill),
        **{k: v - before[k] for k, v in haproxy.retries().items()}}
    log(f"sigkill: {report['sigkill']}")
    assert all(kill_at <= o.ended for o in failed), "no request failed before the kill"
    assert last_failure - kill_at < 5, "every request succeeds again within seconds"
    assert len(after_kill) >= 100  # and all of those succeeded: the last failure came before them

    out = os.environ.get("METTA_LB_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "lb_test.json").write_text(json.dumps(report, indent=2) + "\n")
