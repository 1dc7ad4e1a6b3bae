"""The HTTP layer against real clients on loopback sockets: pipelined requests, trailers, refusals sent
before the body arrived (read to the end by httpx and by a raw socket that keeps sending), clients that never
read, keep-alive after refusals, the connection cap. A real uvicorn server in a thread with `serving_protocol`
(what `metta-serve` runs) and the dummy model, slowed per crop where a request must take a while."""

from __future__ import annotations

import base64
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from service.core.errors import REJECT_REASONS
from tests.integration.conftest import ControlledModel, png_bytes, running_server

LIMITS = {"header_timeout_s": 1.0, "body_timeout_s": 1.0, "max_header_bytes": 8192, "max_headers": 50,
          "write_timeout_s": 1.0, "linger_s": 5.0, "max_body_bytes": 1_000_000,
          "max_inflight_body_bytes": 4_000_000}
SECONDS_PER_CROP = 0.1
GOOD = base64.b64encode(png_bytes(0)).decode()


class Served:
    def __init__(self, address: tuple[str, int], app: FastAPI, server: uvicorn.Server) -> None:
        self.address, self.app, self.server = address, app, server
        self.url = f"http://{address[0]}:{address[1]}"

    def connections(self) -> int:
        return len(self.server.server_state.connections)

    def rejected(self) -> dict[str, float]:
        counter = self.app.state.metta.metrics.rejected
        return {reason: counter.labels(reason)._value.get() for reason in REJECT_REASONS}


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    model = ControlledModel()
    model.seconds_per_crop = SECONDS_PER_CROP
    with running_server(model.loaded(), **LIMITS) as (address, app, server):
        yield Served(address, app, server)


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: test"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body:
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def embed(samples: int) -> bytes:
    """A request the slowed model takes samples × 0.1 s over."""
    return request("POST", "/v1/embeddings", json.dumps({"images": [GOOD], "samples": samples,
                                                          "policy": "crop_flip"}).encode())


class Reader:
    """Reads HTTP/1.1 replies (Content-Length framed) off a socket, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _more(self, deadline: float) -> bool:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def reply(self, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buffer:
            if not self._more(deadline):
                raise ConnectionError(f"closed before a reply; got {self.buffer[:200]!r}")
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not self._more(deadline):
                raise ConnectionError("closed in the middle of a reply")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body

    def end(self, timeout: float = 10.0) -> bytes:
        """What comes before the server's FIN; a reset raises."""
        deadline = time.monotonic() + timeout
        while self._more(deadline):
            pass
        rest, self.buffer = self.buffer, b""
        return rest


def connect(served: Served) -> socket.socket:
    return socket.create_connection(served.address, timeout=10)


# Pipelining

def test_pipelined_requests_slow_slow_fast_are_all_answered_in_order(served: Served) -> None:
    """Three requests written at once, each of the first two running longer than header_timeout_s (1 s):
    no spurious 408 for the second (a head timer armed when the first's reply ended cut it off)."""
    with connect(served) as sock:
        sock.sendall(embed(15) + embed(15) + request("GET", "/healthz"))
        reader = Reader(sock)
        replies = [reader.reply(timeout=20) for _ in range(3)]
    assert [status for status, _, _ in replies] == [200, 200, 200], replies
    assert [json.loads(body).get("samples") for _, _, body in replies[:2]] == [15, 15]
    assert json.loads(replies[2][2]) == {"status": "ok"}


def test_small_pipelined_requests_in_one_write_are_each_counted_as_their_own_head(served: Served) -> None:
    """Three 3 KB heads in one write, 9 KB together, under an 8 KB head limit: three 200s (the bytes of the
    whole read were counted against one head: 431, and the replies lost)."""
    padded = request("GET", "/healthz", headers={"x-pad": "p" * 3000})
    with connect(served) as sock:
        sock.sendall(padded * 3)
        reader = Reader(sock)
        assert [reader.reply()[0] for _ in range(3)] == [200, 200, 200]


def test_a_pipelined_request_whose_body_stalls_does_not_cost_the_reply_ahead_of_it(served: Served) -> None:
    """A runs 2.5 s; B, pipelined behind it, sends 10 of its 100 body bytes and stalls. A gets its 200; B's
    body is on the clock only once B runs: its 408 comes after A's reply (B's timer closed the connection
    while A ran, and A's reply was lost)."""
    with connect(served) as sock:
        sock.sendall(embed(25) + request("POST", "/v1/embeddings", b"x" * 100)[:-90])
        reader = Reader(sock)
        first, second = reader.reply(timeout=20), reader.reply(timeout=20)
        assert first[0] == 200, first
        assert second[0] == 408 and json.loads(second[2])["error"]["type"] == "request_timeout", second
        assert reader.end() == b""


# Trailers

def chunked(body: bytes, trailers: bytes) -> bytes:
    head = (b"POST /v1/embeddings HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    return head + b"%x\r\n%s\r\n0\r\n" % (len(body), body) + trailers


@pytest.mark.parametrize("trailers", [
    pytest.param(lambda: [b"x-t: " + b"a" * 1_000_000 + b"\r\n\r\n"], id="one-huge-trailer"),
    pytest.param(lambda: [b"".join(b"x-t%d: 1\r\n" % i for i in range(200)) + b"\r\n"], id="many-trailers"),
    pytest.param(lambda: [b"x-t%d: %s\r\n" % (i, b"a" * 1000) for i in range(100_000)], id="100-MB-of-trailers"),
])
def test_trailers_are_held_to_the_header_limits(served: Served, trailers) -> None:
    """Trailer fields after a chunked body: 431 within the header limits, counted once (they reached the
    parser's header callback unbounded: 51 MB in 0.05 s, no refusal)."""
    body = json.dumps({"images": [GOOD], "samples": 1}).encode()
    before = served.rejected()
    sent = 0
    with connect(served) as sock:
        sock.sendall(chunked(body, b""))
        try:
            for piece in trailers():
                sock.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, reply = Reader(sock).reply()
    assert status == 431 and json.loads(reply)["error"]["type"] == "headers_too_large"
    assert sent < 50_000_000, "cut short long before the end"
    time.sleep(0.2)
    after = served.rejected()
    assert {reason: after[reason] - before[reason] for reason in after if after[reason] != before[reason]} == {
        "too_large": 1}


# Refusals sent before the body arrived

def test_an_early_refusal_is_read_by_a_raw_socket_that_keeps_sending(served: Served) -> None:
    """Content-Length over max_body_bytes: 413 at the headers. The client sends its whole 1.5 MB body anyway
    without an error, then reads the complete 413 and a clean end (the server closed at once, unread bytes
    turned its close into a reset, and the client's send failed)."""
    body = b"x" * 1_500_000
    with connect(served) as sock:
        sock.sendall(request("POST", "/v1/embeddings", body))  # raises on a reset
        reader = Reader(sock)
        status, headers, reply = reader.reply()
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(reply)["error"]["type"] == "payload_too_large"
        assert reader.end() == b""


def test_refusals_before_and_during_the_body_are_read_by_httpx_clients_uploading_at_once(served: Served) -> None:
    """16 httpx clients at once, each uploading 3 MB: by Content-Length (413 at the headers) or chunked (413
    once past max_body_bytes). Every client reads its 413; none sees a network error; the next request on
    the same client is served."""
    def chunks() -> Iterator[bytes]:
        for _ in range(60):
            yield b"x" * 50_000

    outcomes: list[str] = []

    def client(index: int) -> None:
        with httpx.Client(base_url=served.url, timeout=20) as http:
            for _ in range(3):
                body = chunks() if index % 2 else b"x" * 3_000_000
                try:
                    outcomes.append(str(http.post("/v1/embeddings", content=body,
                                                  headers={"content-type": "application/json"}).status_code))
                    outcomes.append(str(http.get("/healthz").status_code))
                except httpx.HTTPError as error:
                    outcomes.append(type(error).__name__)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["200"] * 48 + ["413"] * 48, outcomes


def test_keep_alive_after_refusals_of_a_whole_request_then_a_clean_end_after_an_early_one(served: Served) -> None:
    """Refusals sent after the body was read leave the connection usable; an early one ends it cleanly."""
    with connect(served) as sock:
        reader = Reader(sock)
        refusals = [request("POST", "/v1/embeddings", json.dumps({"images": [GOOD], "colour": "red"}).encode()),
                    request("POST", "/v1/embeddings", json.dumps({"images": ["AAAA"]}).encode()),
                    request("GET", "/nowhere"),
                    request("POST", "/v1/embeddings", b"{not json")]
        for refused in refusals:
            sock.sendall(refused)
            status, headers, _ = reader.reply()
            assert status in (400, 404, 422) and headers.get("connection") != "close"
            sock.sendall(request("GET", "/healthz"))
            assert reader.reply()[0] == 200
        sock.sendall(request("POST", "/v1/embeddings", b"y" * 1_200_000))
        assert reader.reply()[0] == 413
        assert reader.end() == b""


# Clients that never read

def tcp_state(sock: socket.socket) -> int:
    """The socket's TCP state (Linux's TCP_INFO): 1 established, 7 closed (after a reset)."""
    return sock.getsockopt(socket.SOL_TCP, socket.TCP_INFO, 8)[0]


TCP_CLOSE = 7


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the client's TCP state (TCP_INFO, Linux)")
@pytest.mark.parametrize("requests", [
    pytest.param(200, id="replies-past-the-socket-buffers"),
    pytest.param(1, id="one-reply-the-kernel-holds"),
])
def test_a_client_that_never_reads_is_reset_within_the_write_bound(served: Served, requests: int) -> None:
    """Pipelined requests for the 30 KB OpenAPI document on a socket with a 4 KB receive buffer, never read:
    the server resets the connection (its bytes freed, in the process and in the kernel) within
    header_timeout_s + write_timeout_s (1 + 1 s) and counts one `write_timeout`. It had dropped 200 replies'
    connection with a close the client never saw (the kernel kept the unsent bytes, the FIN behind them), and
    one reply that fit in the kernel's buffer was left there at its idle close, never bounded (on main 02c7108
    the connection and its 6 MB stayed for as long as anyone watched)."""
    settled = time.monotonic() + 5
    while served.connections() and time.monotonic() < settled:  # earlier tests' connections closing
        time.sleep(0.05)
    baseline, before = served.connections(), served.rejected()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(served.address)
    try:
        sock.sendall(request("GET", "/openapi.json") * requests)
        started = time.monotonic()
        while tcp_state(sock) != TCP_CLOSE and time.monotonic() - started < 8:
            time.sleep(0.05)
        reset_after = time.monotonic() - started
        assert tcp_state(sock) == TCP_CLOSE, "the client never learnt that the server dropped it"
        assert reset_after < 4.0, reset_after
        with pytest.raises(ConnectionResetError):  # after what had reached the client's buffer: a reset, no FIN
            while sock.recv(65536):
                pass
        assert served.connections() == baseline, "the server still holds the connection"
        after = served.rejected()
        assert {r: after[r] - before[r] for r in after if after[r] != before[r]} == {"write_timeout": 1}
    finally:
        sock.close()


def test_a_client_that_reads_slowly_but_steadily_gets_its_whole_reply(served: Served) -> None:
    """8 pipelined OpenAPI documents (≈ 250 KB) through a 4 KB receive buffer, a little taken every 0.1 s
    (several write bounds in all): the client keeps taking bytes, so it is not dropped; every reply whole."""
    expected = httpx.get(f"{served.url}/openapi.json").content
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(served.address)
    sock.settimeout(5)
    data, started = b"", time.monotonic()
    with sock:
        sock.sendall(request("GET", "/openapi.json") * 8)
        while data.count(expected) < 8 and time.monotonic() - started < 30:
            time.sleep(0.1)
            chunk = sock.recv(16384)
            if not chunk:
                break
            data += chunk
    assert data.count(expected) == 8
    assert time.monotonic() - started > 2 * LIMITS["write_timeout_s"], "read faster than meant"


# The connection cap

def test_past_the_connection_cap_a_new_connection_gets_a_counted_503() -> None:
    with running_server(max_connections=8, header_timeout_s=30.0) as (address, app, server):
        served = Served(address, app, server)
        held = [connect(served) for _ in range(8)]
        try:
            time.sleep(0.2)
            before = served.rejected()
            with httpx.Client(timeout=5) as client:
                refused = client.get(f"{served.url}/healthz")
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "too_many_connections"
            after = served.rejected()
            assert {r: after[r] - before[r] for r in after if after[r] != before[r]} == {"overloaded": 1}
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.3)
        assert httpx.get(f"{served.url}/healthz", timeout=5).status_code == 200, "room again once they left"


def test_many_connections_at_once_each_get_an_answer(served: Served) -> None:
    """A dozen connections at once, each writing three requests (two that queue behind the others' for
    longer than header_timeout_s, then a fast one): every reply 200, in order."""
    results: list[list[int]] = []

    def client() -> None:
        with connect(served) as sock:
            sock.sendall(embed(2) + embed(2) + request("GET", "/healthz"))
            reader = Reader(sock)
            results.append([reader.reply(timeout=30)[0] for _ in range(3)])

    threads = [threading.Thread(target=client) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    assert results == [[200, 200, 200]] * 12
