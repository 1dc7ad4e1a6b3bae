"""SIGTERM on a real server process: /readyz says 503 at once, work is still served during the lame-duck
delay (`--shutdown-delay-s`), then the port closes and the process exits 0. `make lb-test` shows what this
buys behind a load balancer (a rolling update with zero failed requests)."""

from __future__ import annotations

import base64
import contextlib
import io
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
from PIL import Image

from service.testing import start_server

DELAY_S = 2.0


def test_sigterm_reports_not_ready_at_once_serves_through_the_delay_then_exits_zero(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--model", "sleep:1000", "--device", "cpu", "--shutdown-delay-s", str(DELAY_S))
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, format="PNG")
    body = {"images": [base64.b64encode(buffer.getvalue()).decode()], "samples": 4, "seed": 1}
    try:
        assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
        term_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200, "alive while draining"
        reply = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=30)
        assert reply.status_code == 200, "a request that reaches the port during the delay is served"
        assert time.monotonic() - term_at < DELAY_S
        exit_code = server.process.wait(60)
        assert time.monotonic() - term_at >= DELAY_S, "the port stayed open for the delay"
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)
        server.log_file.close()
    assert exit_code == 0, server.log()


def test_sigterm_with_a_grace_under_a_second_exits_though_a_client_never_reads(tmp_path: Path) -> None:
    """--shutdown-grace-s 0.5 and a client that asked for replies and never reads them (4 KB receive buffer):
    SIGTERM ends the process within seconds (a grace under 1 s was an unbounded wait, and the unread replies
    kept the connection open for good)."""
    server = start_server(tmp_path, "--model", "sleep:1000", "--device", "cpu", "--shutdown-grace-s", "0.5")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nhost: t\r\n\r\n" * 200)
        time.sleep(1.0)
        term_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(15)
        elapsed = time.monotonic() - term_at
        assert server.process.poll() is not None, "still running 15 s after SIGTERM"
        assert elapsed < 10, elapsed
    finally:
        sock.close()
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)
        server.log_file.close()
