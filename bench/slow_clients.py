"""500 slow sockets trickling headers against a real server on loopback; normal clients' latency meanwhile.

    .venv/bin/python -m bench.slow_clients [--sockets 500] [--seconds 15] [--model sleep:1000]

Starts `python -m service` on a loopback port (header timeout 10 s, the default), then two phases of
--seconds each, 4 closed-loop normal clients (one small PNG, S=1) in both:
  idle — nothing else;
  slow — --sockets connections each sending a request line and then one header byte every 0.5 s, never
         finishing; a socket the server closes is opened again at once (as an attacker would), so the
         count stays at --sockets all phase long.
Prints one JSON object: p50/p95/max latency of the normal clients per phase, their status codes, how many
slow sockets the server closed, and its RSS. Loopback only; the file-descriptor soft limit is raised to
the hard limit (the server inherits it). Only the server this script started is signalled, by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import select
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.crash_restart import seconds_to_ready, start
from service.testing import free_port, rss_bytes


def rss_mb(pid: int) -> float:
    return rss_bytes(pid) / 2**20


def normal_clients(url: str, seconds: float, clients: int = 4) -> tuple[list[float], dict[str, int]]:
    buffer = io.BytesIO()
    Image.effect_noise((320, 240), 50).convert("RGB").save(buffer, "PNG")
    files = [("images", ("photo.png", buffer.getvalue()))]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    stop = time.monotonic() + seconds

    def loop() -> None:
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    status = str(client.post(f"{url}/v1/embeddings", files=files,
                                             data={"policy": "center", "samples": "1"}).status_code)
                except httpx.HTTPError as error:
                    status = type(error).__name__
                latencies.append(time.perf_counter() - started)
                statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, statuses


class Trickler:
    """Keeps `count` connections each trickling one header byte every `interval` s; reopens closed ones."""

    def __init__(self, port: int, count: int, interval: float = 0.5) -> None:
        self.port, self.count, self.interval = port, count, interval
        self.closed_by_server = 0
        self.opened = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _open(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setblocking(False)
        sock.send(b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Slow: ")
        self.opened += 1
        return sock

    def _run(self) -> None:
        sockets = [self._open() for _ in range(self.count)]
        while not self.stop.is_set():
            readable, _, _ = select.select(sockets, [], [], 0)  # the server answered (408) or closed
            for sock in readable:
                sockets.remove(sock)
                sock.close()
                self.closed_by_server += 1
                sockets.append(self._open())
            for sock in sockets:
                with contextlib.suppress(OSError):  # a closed one is seen as readable on the next round
                    sock.send(b"a")
            self.stop.wait(self.interval)
        for sock in sockets:
            sock.close()

    def __enter__(self) -> Trickler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def summary(latencies: list[float]) -> dict[str, float]:
    values = np.array(latencies) * 1000
    return {"requests": len(values), "p50_ms": round(float(np.percentile(values, 50)), 1),
            "p95_ms": round(float(np.percentile(values, 95)), 1), "max_ms": round(float(values.max()), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sockets", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--model", default="sleep:1000")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start(args.model, port, Path("/tmp/slow_clients_server.log"), "--mode", "eager")
    try:
        seconds_to_ready(server, url)
        normal_clients(url, 2.0)  # warm
        idle, idle_status = normal_clients(url, args.seconds)
        idle_rss = rss_mb(server.pid)
        with Trickler(port, args.sockets) as trickler:
            time.sleep(1.0)  # all connected
            slow, slow_status = normal_clients(url, args.seconds)
            slow_rss = rss_mb(server.pid)
        print(json.dumps({
            "model": args.model, "slow_sockets": args.sockets,
            "fd_soft_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "idle": {**summary(idle), "statuses": idle_status, "server_rss_mb": round(idle_rss)},
            "slow": {**summary(slow), "statuses": slow_status, "server_rss_mb": round(slow_rss),
                     "slow_sockets_opened": trickler.opened, "closed_by_server": trickler.closed_by_server},
        }))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(90)


if __name__ == "__main__":
    main()
