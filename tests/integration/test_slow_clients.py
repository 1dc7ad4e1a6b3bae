"""The protocol's limits on real loopback sockets: huge and trickled headers, trickled bodies, malformed
requests. A real uvicorn server in a thread with the dummy model and `serving_protocol` (what
`metta-serve` runs); bounded counts and times."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.core.errors import REJECT_REASONS
from service.metrics import Metrics
from tests.integration.conftest import running_server

LIMITS: dict[str, Any] = {"header_timeout_s": 1.0, "body_timeout_s": 1.0, "max_header_bytes": 8192, "max_headers": 50}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[tuple[str, int], Metrics]]:
    """The server's address, and its metrics."""
    with running_server(**LIMITS) as (address, app, _):
        yield address, app.state.metta.metrics


@pytest.fixture
def server(served: tuple[tuple[str, int], Metrics]) -> tuple[str, int]:
    return served[0]


def _reply(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def _error(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]["type"]


def test_a_huge_header_gets_431_in_json_at_once(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as sock:
        started = time.perf_counter()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: ")
        try:
            for _ in range(64):  # up to 4 MB; the server stops reading long before
                sock.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = _reply(sock)
        assert _error(raw) == (431, "headers_too_large")
        assert time.perf_counter() - started < 3


def test_too_many_headers_and_malformed_requests_get_json(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as sock:
        headers = b"".join(b"x-%d: 1\r\n" % i for i in range(60))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + headers + b"\r\n")
        assert _error(_reply(sock)) == (431, "headers_too_large")
    with socket.create_connection(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n")
        assert _error(_reply(sock)) == (400, "invalid_request")


def test_three_dozen_slow_sockets_are_closed_while_others_are_served(server: tuple[str, int]) -> None:
    """36 clients trickle header bytes (one every 0.2 s); each gets 408 or is closed by ~header_timeout_s,
    and normal requests meanwhile are answered promptly."""
    socks = [socket.create_connection(server) for _ in range(36)]
    started = time.monotonic()
    for sock in socks:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        sock.setblocking(False)
    closed: set[int] = set()
    latencies = []
    base = f"http://{server[0]}:{server[1]}"
    while len(closed) < len(socks) and time.monotonic() - started < 5:
        for i, sock in enumerate(socks):
            if i in closed:
                continue
            try:
                sock.send(b"x")
                sock.recv(65536)  # the 408 or EOF: closed by the server
                closed.add(i)
            except BlockingIOError:
                pass  # still open, nothing to read yet
            except OSError:
                closed.add(i)
        t = time.perf_counter()
        assert httpx.get(base + "/healthz", timeout=5).status_code == 200
        latencies.append(time.perf_counter() - t)
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    for sock in socks:
        sock.close()
    assert len(closed) == len(socks), f"{len(socks) - len(closed)} slow sockets still open after {elapsed:.1f} s"
    assert elapsed < 3.5
    assert max(latencies) < 1.0


def test_a_trickled_body_is_cut_off(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n{")
        started = time.monotonic()
        raw = b""
        sock.settimeout(0.2)
        while time.monotonic() - started < 5:
            try:
                sock.send(b" ")
                chunk = sock.recv(65536)
                if not chunk:
                    break
                raw += chunk
            except TimeoutError:
                continue
            except OSError:
                break
        assert time.monotonic() - started < 3.5
        assert raw.startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize(("sends", "status"), [
    pytest.param([b"transfer-encoding: chunked\r\n\r\n5\r\n{\"ima\r\n", 0.3, b"zz\r\nxx\r\n"], 400,
                 id="malformed-chunk"),
    # the body is not complete within body_timeout_s (1 s): the app's own 408, for comparison
    pytest.param([b"content-length: 100\r\n\r\n{\"ima", 0.3, b"g", 0.3, b"e"], 408, id="trickled-body"),
])
def test_a_request_the_protocol_cuts_short_is_counted_once(served: tuple[tuple[str, int], Metrics],
                                                           sends: list[bytes | float], status: int) -> None:
    """The protocol refuses (and counts) a request whose body the app is reading (a malformed chunk); the app
    then sees its client gone and must not count it again (it did: invalid and client_gone for one request)."""
    address, metrics = served

    def counts() -> dict[str, float]:
        return {reason: metrics.rejected.labels(reason)._value.get() for reason in REJECT_REASONS}

    before = counts()
    with socket.create_connection(address) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n")
        try:
            for step in sends:
                if isinstance(step, float):
                    time.sleep(step)
                else:
                    sock.sendall(step)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed before the last bytes: its reply is still there to read
        raw = _reply(sock)
    assert raw.startswith(b"HTTP/1.1 %d" % status), raw[:80]
    time.sleep(1.0)  # the app's own handling of the cut-short request ends after the reply
    moved = {reason: value - before[reason] for reason, value in counts().items() if value != before[reason]}
    assert moved == {"invalid": 1}, moved
