"""A real server under faults: overload, clients vanishing, slow and huge bodies, what the log holds,
and SIGTERM refusing new connections. The dummy model keeps the work bounded; counts, not speeds.
"""

from __future__ import annotations

import base64
import io
import json
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.testing import ServerProcess, rss_bytes, start_server

KEY = "e2e-key-7f3a9c1d5b2e"  # distinctive, so grepping the log for it means something
AUTH = {"Authorization": f"Bearer {KEY}"}
DUMMY = ("--model", "dummy", "--mode", "eager", "--threads", "1", "--decode-workers", "1")


def small_png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 48), 40 + seed).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def scrape(server: ServerProcess, name: str) -> float:
    return metric(httpx.get(f"{server.url}/metrics", timeout=10).text, name)


def rss_mb(server: ServerProcess) -> float:
    return rss_bytes(server.pid) / 2**20


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {timeout} s: {what}"
        time.sleep(0.05)


def raw_request(body: bytes, *, content_length: bool = True) -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if content_length else ""
    return (f"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\n{length}\r\n").encode() + body


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Room for big requests, a short body timeout, a small body limit, an API key and a debug log."""
    proc = start_server(tmp_path_factory.mktemp("roomy"), *DUMMY, "--max-request-crops", "1024",
                        "--max-queue-crops", "16384", "--max-samples", "128", "--body-timeout-s", "2",
                        "--max-body-bytes", "1000000", "--log-level", "debug", "--shutdown-grace-s", "60",
                        env={"METTA_API_KEYS": KEY})
    yield proc
    assert proc.terminate() == 0, proc.log()


def test_overload_at_twice_capacity_gives_200s_and_429s_within_bounds(tmp_path: Path) -> None:
    deadline_s, queue_bound = 10.0, 128
    proc = start_server(tmp_path, *DUMMY, "--max-queue-crops", str(queue_bound), "--max-request-crops", "64",
                        "--max-batch-crops", "16", "--request-timeout-s", str(deadline_s))
    body = {"images": [base64.b64encode(small_png()).decode()], "samples": 64, "seed": 1}
    codes: list[int] = []
    latencies: list[float] = []
    problems: list[str] = []
    queue: list[float] = []
    rss: list[float] = [rss_mb(proc)]
    stop = threading.Event()

    def client() -> None:  # closed loop, retrying at once: offered load far above what is served
        with httpx.Client(base_url=proc.url, timeout=deadline_s + 5) as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    reply = http.post("/v1/embeddings", json=body)
                except httpx.HTTPError as exc:
                    problems.append(repr(exc))
                    continue
                latencies.append(time.monotonic() - started)
                codes.append(reply.status_code)
                if reply.status_code == 429 and int(reply.headers.get("retry-after", "0")) < 1:
                    problems.append("429 without Retry-After")
                if reply.status_code == 429:
                    time.sleep(0.02)

    def sampler() -> None:
        with httpx.Client(base_url=proc.url, timeout=10) as http:
            while not stop.is_set():
                queue.append(metric(http.get("/metrics").text, "metta_queue_crops"))
                rss.append(rss_mb(proc))
                time.sleep(0.1)

    threads = [threading.Thread(target=client) for _ in range(6)] + [threading.Thread(target=sampler)]
    for thread in threads:
        thread.start()
    time.sleep(8)
    stop.set()
    for thread in threads:
        thread.join(deadline_s + 10)
    started = time.monotonic()
    after = httpx.post(f"{proc.url}/v1/embeddings", json=body, timeout=30)
    recovery = time.monotonic() - started
    log = proc.log()
    exit_code = proc.terminate()
    served, refused = codes.count(200), codes.count(429)
    print(f"overload: {len(codes)} replies, {served} x 200, {refused} x 429, max queue {max(queue):.0f}/{queue_bound}"
          f" crops, max latency {max(latencies):.2f} s, RSS {rss[0]:.0f} -> max {max(rss):.0f} MB,"
          f" first request after the load: {recovery * 1000:.0f} ms")
    assert not problems, problems[:5]
    assert served > 0 and refused > 0 and set(codes) <= {200, 429}, sorted(set(codes))
    assert served + refused >= 2 * served, "the load was not at least twice what was served"
    assert max(latencies) <= deadline_s + 2
    assert len(queue) > 10 and max(queue) <= queue_bound
    assert max(rss) - rss[0] < 300, rss
    assert after.status_code == 200
    assert exit_code == 0 and "Traceback" not in log, log[-3000:]


def test_many_clients_vanishing_mid_request_leave_nothing_behind(server: ServerProcess) -> None:
    clients, images, samples = 12, 8, 128
    image = base64.b64encode(small_png(1)).decode()
    body = json.dumps({"images": [image] * images, "samples": samples, "seed": 3, "policy": "crop_flip"}).encode()
    before = httpx.get(f"{server.url}/metrics").text
    crops_before = metric(before, "metta_crops_total")
    gone_before = metric(before, 'metta_rejected_total{reason="client_gone"}')
    sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(clients)]
    for sock in sockets:
        sock.sendall(raw_request(body))
    wait_for(lambda: scrape(server, "metta_inflight_requests") == clients, 30, "all requests in flight")
    for sock in sockets:  # all at once, replies unread
        sock.close()
    wait_for(lambda: scrape(server, 'metta_rejected_total{reason="client_gone"}') - gone_before == clients, 30,
             "every disconnect noticed")
    wait_for(lambda: scrape(server, "metta_inflight_requests") == 0 and scrape(server, "metta_queue_crops") == 0,
             30, "no requests and no queued crops left")
    computed = scrape(server, "metta_crops_total") - crops_before
    time.sleep(1.0)
    assert scrape(server, "metta_crops_total") - crops_before == computed  # nothing runs for them later
    total = clients * images * samples
    print(f"disconnects: {computed:.0f} of {total} crops computed for {clients} vanished clients")
    assert computed < total / 2
    ok = httpx.post(f"{server.url}/v1/embeddings", json={"images": [image], "samples": 2}, headers=AUTH, timeout=30)
    assert ok.status_code == 200


def test_a_client_sending_a_byte_at_a_time_is_cut_off_and_holds_no_capacity(server: ServerProcess) -> None:
    image = base64.b64encode(small_png(2)).decode()
    body = f'{{"images": ["{image}"], "samples": 2}}'.encode()
    request = raw_request(body)
    reply = bytearray()
    reset = []

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.settimeout(10)
            head, payload = request.split(b"\r\n\r\n", 1)
            sock.sendall(head + b"\r\n\r\n")
            for i in range(len(payload)):  # ~4 KB at 100 bytes/s: 40 s, unless cut off
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered
                try:
                    sock.sendall(payload[i : i + 1])
                except OSError:
                    break
                time.sleep(0.01)
            try:
                while chunk := sock.recv(65536):  # to EOF: the server closes the connection after its 408
                    reply.extend(chunk)
            except ConnectionResetError:  # a byte sent as the server closed: the kernel answers it with a reset
                reset.append(True)

    slow = threading.Thread(target=trickle)
    started = time.monotonic()
    slow.start()
    served = 0
    while slow.is_alive() and time.monotonic() - started < 1.5:  # inside the 2 s body timeout
        assert scrape(server, "metta_inflight_requests") == 0  # the slow one is not admitted
        ok = httpx.post(f"{server.url}/v1/embeddings", json={"images": [image], "samples": 2}, headers=AUTH,
                        timeout=30)
        assert ok.status_code == 200
        served += 1
    slow.join(30)
    assert served >= 1
    head = bytes(reply).split(b"\r\n\r\n", 1)[0].decode()
    if reply or not reset:  # unless a reset beat the reply to the client, the 408 must be there
        assert head.startswith("HTTP/1.1 408"), bytes(reply)[:300]
        assert b'"request_timeout"' in reply
        assert "connection: close" in head.lower()
    assert time.monotonic() - started < 20  # cut off by the 2 s body timeout, not after its 40 s of trickling


def test_a_huge_streamed_body_is_refused_without_being_held(server: ServerProcess) -> None:
    """200 MB with no Content-Length (chunked) against a 1 MB limit: 413, and the RSS does not follow."""
    rss_before = rss_mb(server)
    peak = [rss_before]
    sent = 0
    chunk = b"A" * 65536
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak.append(rss_mb(server))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    reply = b""
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.settimeout(10)
            head = raw_request(b"", content_length=False).replace(
                b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            prefix = b'{"images": ["'
            sock.sendall(head + f"{len(prefix):x}\r\n".encode() + prefix + b"\r\n")
            try:
                while sent < 200 * 2**20:
                    sock.sendall(framed)
                    sent += len(chunk)
            except OSError:
                pass  # the server stopped reading and closed: what we want
            try:
                while part := sock.recv(65536):
                    reply += part
            except OSError:
                pass
    finally:
        done.set()
        watcher.join(10)
    print(f"huge body: the client got {sent / 2**20:.1f} MB out before the server closed; "
          f"RSS {rss_before:.0f} -> peak {max(peak):.0f} MB")
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    assert max(peak) - rss_before < 50
    assert sent < 100 * 2**20, "the server kept reading (and discarding) a body it had already refused"
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_the_log_holds_request_ids_but_no_keys_images_or_embeddings(server: ServerProcess) -> None:
    image = small_png(4)
    encoded = base64.b64encode(image).decode()
    url = f"{server.url}/v1/embeddings"
    body = {"images": [encoded], "samples": 2, "seed": 9}
    wrong = httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}x"}, timeout=30)
    scheme = httpx.post(url, json=body, headers={"Authorization": f"Basic {KEY}"}, timeout=30)
    good = httpx.post(url, json=body, headers=AUTH, timeout=30)
    form = httpx.post(url, files=[("images", ("a.png", image, "image/png"))], data={"samples": "2"}, headers=AUTH,
                      timeout=30)
    bad = httpx.post(url, json={"images": [base64.b64encode(b"<html>" + image[:40]).decode()]}, headers=AUTH,
                     timeout=30)
    assert [r.status_code for r in (wrong, scheme, good, form, bad)] == [401, 401, 200, 200, 400]
    time.sleep(0.5)
    log = server.log()
    assert KEY not in log and KEY[:10] not in log
    assert encoded[:24] not in log and encoded[-24:] not in log
    for value in good.json()["data"][0]["embedding"][:4] + form.json()["data"][0]["embedding"][:4]:
        assert repr(value)[:10] not in log
    for reply in (wrong, good, form, bad):
        assert f"request_id={reply.headers['x-request-id']}" in log


def test_sigterm_refuses_new_connections_while_draining(server: ServerProcess) -> None:
    image = base64.b64encode(small_png(5)).decode()
    replies: list[int | str] = []

    def post() -> None:
        try:
            reply = httpx.post(f"{server.url}/v1/embeddings", headers=AUTH, timeout=60,
                               json={"images": [image] * 8, "samples": 128, "seed": 1, "policy": "crop_flip"})
            replies.append(reply.status_code)
        except httpx.HTTPError as exc:
            replies.append(repr(exc))

    threads = [threading.Thread(target=post) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: scrape(server, "metta_inflight_requests") == 3, 30, "requests in flight")
    server.process.send_signal(15)
    time.sleep(0.5)
    refused = None
    if server.process.poll() is None and scrape_or_none(server) is None:
        refused = True
    for thread in threads:
        thread.join(60)
    assert server.process.wait(60) == 0
    assert replies == [200, 200, 200], replies
    assert refused, "the draining server still accepted a new connection (or finished before we could check)"


def scrape_or_none(server: ServerProcess) -> float | None:
    try:
        return scrape(server, "metta_inflight_requests")
    except httpx.ConnectError:
        return None
