"""The HTTP door against hostile and careless clients, on a real server over loopback (issues 20 and 21).

    .venv/bin/python -m bench.door SCENARIO [--runs N] [--seconds S] [--out FILE]

Each scenario starts its own `python -m service` on a free loopback port (stopped by PID at the end), runs
bounded clients against it, and prints one JSON object with its figures (and writes it to --out):

  flood       32 httpx clients × 16 panorama PNGs (256 × 12,000 px, multipart, ≈ 10 MB a request) at S=1,
              --max-queue-pixels 100000000 --max-queue-crops 256, --seconds (25) per run, --runs (3): every
              reply's status, every client error, the server's RSS over idle.
  senders     the body budget held full by 4 uploads that stall just short of their end; 16 raw sockets each
              send a 60 MB body at full speed while reading: did each read a complete 429 with Retry-After?
  trailers    a chunked POST followed by 100 MB of trailer fields: the reply, how much was sent, RSS growth.
  pipelining  --header-timeout-s 1; 1, 24 and then 48 connections at once, each writing three requests at once
              (the first running ≈ 1.6 s on the sleep model, the second ≈ 0.2 s, then GET /healthz): every reply;
              then 48 again with --request-timeout-s 300 (48 connections bring 86 s of the sleep model's serial
              work, past the default 60 s deadline).
  readers     8 clients ask for 7.5 MB replies (256 images, variance, --max-images 256, sleep:0, a queue with
              room for all 8) with a 4 KB receive buffer and never read: when the server drops each (default
              write_timeout_s, 60 s) and how the client learns it (reset or FIN), the replies by code, RSS idle,
              after 8 clients that read the same replies, at the peak and after the drop; then SIGTERM with
              --shutdown-grace-s 0.5 and 8 fresh non-readers: exit time.
  squatters   288 sockets that send only headers declaring 1 MB / 64 KB / 4 KB bodies (over the whole
              256 MB body budget), reopened when closed, for --seconds (20); 2 good clients post photos: status
              counts.
  connections 25,000 held connections (POST headers and a few body bytes, from 2 client processes of 12,500,
              each raising its own descriptor limit); then good requests on new connections: served or a
              counted 503? RSS over idle.

Loopback only; the machine is shared, so run under `flock /work/.heavy.lock`.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.testing import ServerProcess, photos, start_server

MB = 2**20


def rss_mb(server: ServerProcess) -> float:
    return server.rss_bytes() / MB


class PeakRss:
    """The server's RSS sampled every 0.2 s in a thread while the block runs."""

    def __init__(self, server: ServerProcess) -> None:
        self.server, self.peak, self._stop = server, 0.0, threading.Event()

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.peak = max(self.peak, rss_mb(self.server))
            except OSError:
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


def rejected(server: ServerProcess) -> dict[str, float]:
    counts = {}
    for line in server.metrics_text().splitlines():
        if line.startswith("metta_rejected_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            counts[reason] = float(line.rsplit(" ", 1)[1])
    return counts


def raise_descriptor_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit), hard))
    return limit


def _read_framed(sock: socket.socket, data: bytes) -> tuple[int, dict[str, str], bytes, bytes, str]:
    """One Content-Length framed reply after the bytes already read (`data`): (status, headers, body, the
    bytes read past it, 'ok' | 'eof-before-reply' | 'eof-mid-reply'). Socket errors propagate."""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, {}, data, b"", "eof-before-reply"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return status, headers, rest, b"", "eof-mid-reply"
        rest += chunk
    return status, headers, rest[:length], rest[length:], "ok"


def read_reply(sock: socket.socket, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes, str]:
    """One Content-Length framed reply; the last item says how the connection ended after it
    ('eof', 'reset', 'open') or what went wrong before it ('reset-before-reply', ...)."""
    sock.settimeout(timeout)
    try:
        status, headers, body, _, outcome = _read_framed(sock, b"")
    except ConnectionResetError:
        return 0, {}, b"", "reset-before-reply"
    except TimeoutError:
        return 0, {}, b"", "timeout-before-reply"
    if outcome != "ok":
        return status, headers, body, outcome
    try:
        sock.settimeout(5)
        ending = "eof" if not sock.recv(65536) else "more"
    except ConnectionResetError:
        ending = "reset"
    except TimeoutError:
        ending = "open"
    return status, headers, body, ending


_buffers: dict[int, bytes] = {}


def read_reply_keep(sock: socket.socket, timeout: float = 600.0) -> tuple[int, dict[str, str], bytes, str]:
    """Like read_reply, for a connection that carries more replies: bytes past this reply are kept."""
    sock.settimeout(timeout)
    data = _buffers.pop(sock.fileno(), b"")
    try:
        status, headers, body, rest, outcome = _read_framed(sock, data)
    except OSError as error:
        return 0, {}, data, type(error).__name__
    if outcome == "ok":
        _buffers[sock.fileno()] = rest
    return status, headers, body, outcome


# ------------------------------------------------------------------------------------------ scenarios

def panorama_png() -> bytes:
    """256 × 12,000 px, ≈ 0.6 MB: a gradient with a little noise (compresses as a real panorama does)."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, 12_000, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, 256, dtype=np.float32)[:, None, None]
    pixels = (x * 0.6 + y * 0.4 + np.array([0, 40, 80], dtype=np.float32)) % 256
    pixels = (pixels + rng.integers(0, 3, pixels.shape)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def flood_client(url: str, files: list[tuple[str, tuple[str, bytes, str]]], stop: float,
                 statuses: Counter[str]) -> None:
    with httpx.Client(timeout=60) as http:
        while time.monotonic() < stop:
            try:
                reply = http.post(f"{url}/v1/embeddings", files=files, data={"samples": "1", "policy": "center"})
                statuses[str(reply.status_code)] += 1
                if reply.status_code == 429 and "retry-after" not in reply.headers:
                    statuses["429-without-retry-after"] += 1
            except httpx.HTTPError as error:
                statuses[type(error).__name__] += 1


def flood(log_dir: Path, seconds: float, runs: int) -> dict[str, object]:
    png = panorama_png()
    files = [("images", (f"p{i}.png", png, "image/png")) for i in range(16)]
    results = []
    for run in range(runs):
        server = start_server(log_dir, "--max-queue-pixels", "100000000", "--max-queue-crops", "256",
                              "--max-request-crops", "256")
        try:
            idle = rss_mb(server)
            statuses: Counter[str] = Counter()
            with PeakRss(server) as peak:
                stop = time.monotonic() + seconds
                threads = [threading.Thread(target=flood_client, args=(server.url, files, stop, statuses))
                           for _ in range(32)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(seconds + 120)
            results.append({"run": run, "statuses": dict(statuses), "png_bytes": len(png),
                            "rss_idle_mb": round(idle), "rss_peak_mb": round(peak.peak),
                            "rss_growth_mb": round(peak.peak - idle), "server_rejected": rejected(server)})
        finally:
            server.stop()
    return {"scenario": "flood", "seconds": seconds, "runs": results}


def senders(log_dir: Path) -> dict[str, object]:
    server = start_server(log_dir, "--model", "sleep:1000", "--device", "cpu")
    body_limit = 64 * MB
    holders = []
    try:
        for _ in range(4):  # 4 × (64 MB - 1 MB) arrive and stall: 252 MB of the 256 MB budget held
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n" % body_limit)
            sent, piece = 0, b" " * MB
            while sent < body_limit - MB:
                sock.sendall(piece)
                sent += len(piece)
            holders.append(sock)
        time.sleep(1.0)
        outcomes: list[dict[str, object]] = []
        size = 60 * MB

        def sender() -> None:
            sock = socket.create_connection(("127.0.0.1", server.port))
            outcome: dict[str, object] = {}

            def send() -> None:
                try:
                    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n" % size)
                    piece, sent = b"x" * MB, 0
                    while sent < size:
                        sock.sendall(piece)
                        sent += len(piece)
                    outcome["sent_mb"] = sent // MB
                except OSError as error:
                    outcome["send_error"] = type(error).__name__

            writer = threading.Thread(target=send)
            writer.start()
            status, headers, _, ending = read_reply(sock, timeout=60)
            writer.join(60)
            sock.close()
            outcome.update(status=status, retry_after=headers.get("retry-after"), ending=ending)
            outcomes.append(outcome)

        threads = [threading.Thread(target=sender) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        complete = sum(1 for o in outcomes if o["status"] == 429 and o["retry_after"])
        return {"scenario": "senders", "complete_429_with_retry_after": complete, "of": len(outcomes),
                "endings": dict(Counter(str(o["ending"]) for o in outcomes)),
                "send_errors": dict(Counter(str(o.get("send_error")) for o in outcomes if "send_error" in o)),
                "server_rejected": rejected(server)}
    finally:
        for sock in holders:
            sock.close()
        server.stop()


def trailers(log_dir: Path) -> dict[str, object]:
    server = start_server(log_dir, "--model", "sleep:1000", "--device", "cpu")
    try:
        time.sleep(1.0)
        idle = rss_mb(server)
        body = json.dumps({"images": [], "samples": 1}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n" % (len(body), body))
        sent, field = 0, b"x-trailer: " + b"a" * 1000 + b"\r\n"
        piece = field * 64
        started = time.monotonic()
        with PeakRss(server) as peak:
            try:
                while sent < 100 * MB:
                    sock.sendall(piece)
                    sent += len(piece)
            except OSError as error:
                send_end = type(error).__name__
            else:
                send_end = "all sent"
            status, _, reply, _ = read_reply(sock)
            time.sleep(1.0)
        sock.close()
        return {"scenario": "trailers", "status": status, "reply": reply.decode(errors="replace")[:200],
                "sent_mb": round(sent / MB, 2), "send_end": send_end, "seconds": round(time.monotonic() - started, 2),
                "rss_idle_mb": round(idle), "rss_peak_mb": round(peak.peak), "rss_growth_mb": round(peak.peak - idle),
                "server_rejected": rejected(server)}
    finally:
        server.stop()


def pipelined_connections(port: int, connections: int, three: bytes) -> dict[str, object]:
    """`connections` sockets at once, each writing `three` requests in one write and reading three replies."""
    replies: list[list[int]] = []
    errors: Counter[str] = Counter()

    def one() -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(three)
            got = []
            for _ in range(3):
                status, _, body, _ = read_reply_keep(sock)
                got.append(status)
                if status != 200:
                    errors[f"{status}: {body.decode(errors='replace')[:160]}"] += 1
            replies.append(got)

    started = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return {"replies": dict(Counter(",".join(map(str, r)) for r in replies)), "not_200": dict(errors),
            "seconds": round(time.monotonic() - started, 1)}


def pipelining(log_dir: Path) -> dict[str, object]:
    png = photos(1).images[0]
    import base64

    def embed(samples: int) -> bytes:
        body = json.dumps({"images": [base64.b64encode(png).decode()], "samples": samples,
                           "policy": "crop_flip"}).encode()
        return (b"POST /v1/embeddings HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n" % len(body) + body)

    three = embed(32) + embed(4) + b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n"
    # The sleep model does 20 crops/s whatever the batch, so n connections bring n × 1.8 s of serial work: 24 of
    # them 43 s, 48 of them 86 s, past the default 60 s deadline, where the engine's admission refuses some first
    # requests (429 "would take past its deadline", or 504 where its estimate fell short). That is the deadline
    # at work, not the protocol: 48 connections run again on a server with a deadline long enough for them.
    runs: dict[str, dict[str, object]] = {}
    for deadline, counts in ((None, (1, 24, 48)), ("300", (48,))):
        flags = ["--model", "sleep:50000", "--device", "cpu", "--header-timeout-s", "1"]
        if deadline is not None:
            flags += ["--request-timeout-s", deadline]
        server = start_server(log_dir, *flags)
        try:
            figures: dict[str, object] = {str(n): pipelined_connections(server.port, n, three) for n in counts}
            runs[f"request_timeout_s={deadline or '60 (default)'}"] = {
                "connections": figures, "server_rejected": rejected(server)}
        finally:
            server.stop()
    return {"scenario": "pipelining", "runs": runs}




def never_reader(port: int, body: bytes) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n" % len(body) + body)
    return sock


TCP_STATES = {1: "established", 7: "reset", 8: "fin"}  # the client's view (Linux TCP_INFO): 7 after a reset, 8 a FIN


def tcp_state(sock: socket.socket) -> str:
    state = sock.getsockopt(socket.SOL_TCP, socket.TCP_INFO, 8)[0]
    return TCP_STATES.get(state, str(state))


def replies_by_code(server: ServerProcess) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in server.metrics_text().splitlines():
        if line.startswith("metta_requests_total{") and 'endpoint="/v1/embeddings"' in line:
            code = line.split('code="')[1].split('"')[0]
            counts[code] = counts.get(code, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def log_times(server: ServerProcess, text: str) -> list[float]:
    """When the server logged lines containing `text` (epoch seconds, from the log's timestamps), in order."""
    import datetime

    times = []
    for line in server.log().splitlines():
        if text in line and line[:4].isdigit():
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            times.append(stamp.timestamp())
    return times


def readers(log_dir: Path) -> dict[str, object]:
    import base64

    tiny = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(tiny, "PNG")
    body = json.dumps({"images": [base64.b64encode(tiny.getvalue()).decode()] * 256, "samples": 2,
                       "policy": "crop_flip", "return_variance": True}).encode()
    # 8 × 512 crops queued at once: a queue with room for them all (the default 2048 refused half with a 429,
    # whose connections then only met the idle timeout: not what this measures).
    flags = ("--model", "sleep:0", "--device", "cpu", "--max-images", "256", "--max-queue-crops", "4096")
    server = start_server(log_dir, *flags)
    try:
        time.sleep(1.0)
        idle = rss_mb(server)
        reply = httpx.post(f"{server.url}/v1/embeddings", content=body,
                           headers={"content-type": "application/json"}, timeout=120)
        assert reply.status_code == 200, reply.text[:300]
        reply_mb = len(reply.content) / MB

        def reading_client() -> None:  # the same work, read by its clients: what the work itself leaves in RSS
            httpx.post(f"{server.url}/v1/embeddings", content=body, headers={"content-type": "application/json"},
                       timeout=120).raise_for_status()

        threads = [threading.Thread(target=reading_client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        time.sleep(2.0)
        after_readers = rss_mb(server)
        socks = [never_reader(server.port, body) for _ in range(8)]
        started = time.monotonic()
        dropped_after: list[float] = []
        endings: Counter[str] = Counter()
        with PeakRss(server) as peak:
            pending = set(range(len(socks)))
            while pending and time.monotonic() - started < 150:
                for index in list(pending):
                    state = tcp_state(socks[index])
                    if state != "established":  # the server dropped us
                        dropped_after.append(round(time.monotonic() - started, 1))
                        endings[state] += 1
                        pending.discard(index)
                time.sleep(0.5)
        time.sleep(2.0)
        after = rss_mb(server)
        for sock in socks:
            sock.close()
        # From the server's log: each reply handed to the socket (its 200 logged) to its connection dropped.
        written, dropped = log_times(server, "POST /v1/embeddings -> 200")[-8:], log_times(server, "dropped a client")
        result: dict[str, object] = {
            "reply_mb": round(reply_mb, 1), "clients": len(socks), "dropped_after_s": sorted(dropped_after),
            "reply_written_to_drop_s": [round(d - w, 1) for w, d in zip(written, dropped, strict=False)],
            "not_dropped_within_150_s": len(pending), "client_saw": dict(endings),
            "embeddings_replies_by_code": replies_by_code(server), "server_rejected": rejected(server),
            "rss_idle_mb": round(idle), "rss_after_8_reading_clients_mb": round(after_readers),
            "rss_peak_mb": round(peak.peak), "rss_after_drop_mb": round(after)}
    finally:
        server.stop()
    server = start_server(log_dir, *flags, "--shutdown-grace-s", "0.5")
    try:
        socks = [never_reader(server.port, body) for _ in range(8)]
        time.sleep(5.0)
        term_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = server.process.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        result["sigterm_exit_s"] = round(time.monotonic() - term_at, 2) if code is not None else "> 30"
        result["sigterm_exit_code"] = code
        for sock in socks:
            sock.close()
    finally:
        server.stop()
    return {"scenario": "readers", **result}


def squatters(log_dir: Path, seconds: float) -> dict[str, object]:
    server = start_server(log_dir, "--model", "sleep:1000", "--device", "cpu")
    lengths = [MB, 64 * 1024, 4096]
    stop = time.monotonic() + seconds
    reopened = Counter[str]()

    def squat(index: int) -> None:
        length = lengths[index % 3]
        while time.monotonic() < stop:
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n" % length)
                    sock.settimeout(max(0.1, stop - time.monotonic()))
                    sock.recv(65536)  # until the server answers or closes
                    reopened["reopened"] += 1
            except OSError:
                reopened["error"] += 1

    good = Counter[str]()
    images = photos(8).images

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            i = 0
            while time.monotonic() < stop:
                try:
                    reply = http.post(f"{server.url}/v1/embeddings", files=[("images", ("a.jpg", images[i % 8]))],
                                      data={"samples": "8"})
                    good[str(reply.status_code)] += 1
                except httpx.HTTPError as error:
                    good[type(error).__name__] += 1
                i += 1

    try:
        threads = [threading.Thread(target=squat, args=(i,), daemon=True) for i in range(288)]
        threads += [threading.Thread(target=client) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 60)
        total = sum(good.values())
        return {"scenario": "squatters", "seconds": seconds, "good": dict(good),
                "good_200_share": round(good["200"] / total, 3) if total else None,
                "squatters": dict(reopened), "server_rejected": rejected(server)}
    finally:
        server.stop()


def hold_connections(port: int, count: int, ready: Path, release: Path) -> None:
    """In a client process of its own: `count` held POSTs; writes how many the server kept open to `ready`,
    then holds them until `release` exists."""
    raise_descriptor_limit(count + 256)
    socks, refused, failed = [], 0, 0
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                         b"content-length: 1000000\r\n\r\n{\"images\": [")
            socks.append(sock)
        except OSError:
            failed += 1
    time.sleep(2.0)
    kept = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            data = sock.recv(65536)
            refused += data.startswith(b"HTTP/1.1 503")
        except BlockingIOError:
            kept += 1
        except OSError:
            pass
    ready.write_text(json.dumps({"kept": kept, "refused_503": refused, "connect_failed": failed}))
    deadline = time.monotonic() + 120
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def connections(log_dir: Path) -> dict[str, object]:
    server = start_server(log_dir, "--model", "sleep:1000", "--device", "cpu", "--header-timeout-s", "60",
                          "--body-timeout-s", "60")
    tmp = Path(tempfile.mkdtemp(prefix="door-bench-"))
    release = tmp / "release"
    holders: list[subprocess.Popen[bytes]] = []
    try:
        time.sleep(1.0)
        idle = rss_mb(server)
        with PeakRss(server) as peak:
            for index in range(2):
                holders.append(subprocess.Popen([sys.executable, "-m", "bench.door", "hold", "--port",
                                                 str(server.port), "--count", "12500", "--ready",
                                                 str(tmp / f"ready{index}")]))
            deadline = time.monotonic() + 240
            while not all((tmp / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
                time.sleep(0.5)
            held = [json.loads((tmp / f"ready{i}").read_text()) for i in range(2) if (tmp / f"ready{i}").exists()]
            good = Counter[str]()
            images = photos(4).images
            for i in range(20):
                try:
                    reply = httpx.post(f"{server.url}/v1/embeddings", files=[("images", ("a.jpg", images[i % 4]))],
                                       data={"samples": "2"}, timeout=30)
                    good[str(reply.status_code)] += 1
                except httpx.HTTPError as error:
                    good[type(error).__name__] += 1
            during = rss_mb(server)
        release.write_text("go")
        for holder in holders:
            holder.wait(60)
        return {"scenario": "connections", "held": held, "good_new_connections": dict(good),
                "rss_idle_mb": round(idle), "rss_held_mb": round(during), "rss_peak_mb": round(peak.peak),
                "rss_growth_mb": round(peak.peak - idle), "server_rejected": rejected(server)}
    finally:
        release.write_text("go")
        for holder in holders:
            if holder.poll() is None:
                holder.kill()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=["flood", "senders", "trailers", "pipelining", "readers", "squatters",
                                             "connections", "hold"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--ready", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scenario == "hold":
        assert args.ready is not None
        hold_connections(args.port, args.count, args.ready, args.ready.parent / "release")
        return
    log_dir = Path(tempfile.mkdtemp(prefix="door-bench-logs-"))
    scenarios: dict[str, Callable[[], dict[str, object]]] = {
        "flood": lambda: flood(log_dir, args.seconds or 25.0, args.runs),
        "senders": lambda: senders(log_dir),
        "trailers": lambda: trailers(log_dir),
        "pipelining": lambda: pipelining(log_dir),
        "readers": lambda: readers(log_dir),
        "squatters": lambda: squatters(log_dir, args.seconds or 20.0),
        "connections": lambda: connections(log_dir),
    }
    result = scenarios[args.scenario]()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
