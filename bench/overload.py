"""Overload: a real server offered several times what it can serve, for a bounded time.

    .venv/bin/python -m bench.overload --seconds 120 --clients 8 --out overload.json   # default model
    .venv/bin/python -m bench.overload --server-args "--model dummy --mode eager" --seconds 30

Closed-loop clients send the soak's good mix (S in {1, 4, 8, 16}, the sample photos or synthetic JPEGs) and
retry at once after a 429 (after 50 ms, not after Retry-After: the point is to keep the queue full). Sampled
every 0.2 s: the queue gauge (metta_queue_crops) against its bound and the server's RSS. Reported:
replies by status, the offered/served ratio, latency of the 200s against the request deadline,
Retry-After values, peak queue and RSS, and the time the first request after the load takes.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.soak import PHOTOS, gauge, good_request, percentile, rss_mb
from service.testing import photos, start_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--server-args", default="--model efficientnet_lite0 --max-queue-crops 64 "
                        "--max-request-crops 32 --request-timeout-s 60")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    server = start_server(Path(tempfile.mkdtemp(prefix="metta-overload-")), *args.server_args.split())
    print(f"server: {server.url} pid {server.pid}, log {server.log_path}", flush=True)
    pictures = photos(PHOTOS)
    pics = pictures.images
    codes: collections.Counter[str] = collections.Counter()
    latency: list[float] = []
    retry_after: collections.Counter[str] = collections.Counter()
    queue: list[float] = []
    rss = [rss_mb(server.pid)]
    bound = gauge(httpx.get(f"{server.url}/metrics").text, "metta_max_queue_crops")
    stop = threading.Event()
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=server.url, timeout=300) as http:
            while not stop.is_set():
                _, kwargs = good_request(rng, pics)
                started = time.monotonic()
                try:
                    reply = http.post("/v1/embeddings", **kwargs)
                except httpx.HTTPError as exc:
                    with lock:
                        codes[type(exc).__name__] += 1
                    continue
                with lock:
                    codes[str(reply.status_code)] += 1
                    if reply.status_code == 200:
                        latency.append(time.monotonic() - started)
                    elif reply.status_code == 429:
                        retry_after[reply.headers.get("retry-after", "missing")] += 1
                if reply.status_code == 429:
                    time.sleep(0.05)

    def sampler() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                queue.append(gauge(http.get("/metrics").text, "metta_queue_crops"))
                rss.append(rss_mb(server.pid))
                time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    threads.append(threading.Thread(target=sampler))
    try:
        for thread in threads:
            thread.start()
        time.sleep(args.seconds)
        stop.set()
        for thread in threads:
            thread.join()
        started = time.monotonic()
        after = httpx.post(f"{server.url}/v1/embeddings", **good_request(random.Random(99), pics)[1], timeout=300)
        recovery = time.monotonic() - started
        log = server.log()
    finally:
        stop.set()
        exit_code = server.terminate()
    served = codes.get("200", 0)
    report = {
        "seconds": args.seconds, "clients": args.clients, "server_args": args.server_args, "photos": pictures.source,
        "replies": dict(codes), "offered_over_served": round(sum(codes.values()) / max(served, 1), 2),
        "served_per_s": round(served / args.seconds, 3),
        "latency_200_s": {"p50": round(percentile(latency, 50), 2), "p99": round(percentile(latency, 99), 2),
                          "max": round(max(latency, default=float("nan")), 2)},
        "retry_after_s": dict(retry_after), "queue_crops_peak": max(queue, default=0), "queue_bound": bound,
        "rss_mb": {"start": round(rss[0]), "peak": round(max(rss)), "end": round(rss[-1])},
        "first_request_after_load": {"status": after.status_code, "seconds": round(recovery, 2)},
        "server_exit_code": exit_code, "server_log_tracebacks": log.count("Traceback"),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
