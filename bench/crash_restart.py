"""Crash-only: kill -9 a loaded server, start it again on the same port, time until /readyz says 200.

    .venv/bin/python -m bench.crash_restart [--model efficientnet_lite0] [--repeats 3] [--load-s 5]

Each round: start `python -m service` on a loopback port, wait for ready, run 4 closed-loop clients
(2 sample photos, S=8) for --load-s seconds, SIGKILL the server while requests are in flight, start a
new one on the same port at once and time it: process start → /readyz 200 (what a supervisor's
restart costs). Prints one JSON object. Only processes this script started are signalled, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from service.testing import REPO, free_port, photos


def start(model: str, port: int, log: Path, *flags: str) -> subprocess.Popen[bytes]:
    """`python -m service` on 127.0.0.1:port, its output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                                 "--model", model, *flags], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def seconds_to_ready(process: subprocess.Popen[bytes], url: str, timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode} before ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"not ready within {timeout} s")


def load(url: str, photos: list[bytes], stop: threading.Event, counts: dict[str, int]) -> None:
    files = [("images", (f"{i}.jpg", photo)) for i, photo in enumerate(photos)]
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            try:
                reply = client.post(f"{url}/v1/embeddings", files=files, data={"samples": "8", "seed": "1"})
                status = reply.status_code
                counts[str(status)] = counts.get(str(status), 0) + 1
            except httpx.TransportError:
                counts["connection lost"] = counts.get("connection lost", 0) + 1
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load-s", type=float, default=5.0)
    parser.add_argument("--log", type=Path, default=Path("/tmp/crash_restart.log"))
    args = parser.parse_args()
    images = photos(2).images
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start(args.model, port, args.log)
    cold = seconds_to_ready(server, url)
    rounds: list[dict[str, object]] = []
    ready: list[float] = []
    try:
        for _ in range(args.repeats):
            stop, counts = threading.Event(), dict[str, int]()
            clients = [threading.Thread(target=load, args=(url, images, stop, counts)) for _ in range(4)]
            for client in clients:
                client.start()
            time.sleep(args.load_s)
            os.kill(server.pid, signal.SIGKILL)  # ours, by PID
            server.wait(30)
            stop.set()
            for client in clients:
                client.join(30)
            server = start(args.model, port, args.log)
            ready.append(round(seconds_to_ready(server, url), 2))
            rounds.append({"ready_after_restart_s": ready[-1], "replies": counts})
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(120)
    print(json.dumps({"model": args.model, "cold_start_s": round(cold, 2), "rounds": rounds,
                      "ready_after_restart_max_s": max(ready) if ready else None}))


if __name__ == "__main__":
    main()
