"""Soak: a real server at a steady fraction of its capacity for minutes, with mixed S and bad inputs.

    .venv/bin/python -m bench.soak --minutes 10 --load 0.7 --out soak.json           # starts a server
    .venv/bin/python -m bench.soak --minutes 10 --url http://127.0.0.1:8000 --rate 0.5   # an existing one

First (unless --rate is given) it measures capacity: closed-loop clients send the same mix for
--calibrate-s seconds and the served requests/s is taken as capacity. Then requests arrive open-loop
(Poisson) at --load x capacity for --minutes: S drawn from {1 (center), 4, 8, 16}, 1-2 real photos
($METTA_SAMPLES_DIR, else synthetic JPEGs of their sizes), and --bad-fraction of bad inputs of every
kind (not an image, truncated JPEG, SVG, a decompression bomb, bad options, invalid base64).
Reported: requests served, replies by status and error type, latency percentiles of the good ones,
the server's RSS at start and end (and peak), the queue gauge's peak, and the process's final state.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import random
import re
import struct
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from service.testing import photos, rss_bytes, start_server

PHOTOS = 12  # the good requests draw from this many photos


def _bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bad_requests(photo: bytes) -> list[tuple[str, dict]]:
    """(expected error type, httpx kwargs) for each kind of bad input the soak mixes in."""
    return [
        ("invalid_image", {"json": {"images": [b64(b"<html>not an image</html>")]}}),
        ("invalid_image", {"json": {"images": [b64(photo[: len(photo) // 3])]}}),
        ("invalid_image", {"files": [("images", ("x.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                                  "image/svg+xml"))]}),
        ("payload_too_large", {"json": {"images": [b64(_bomb())]}}),
        ("invalid_option", {"json": {"images": [b64(photo)], "samples": 0}}),
        ("invalid_option", {"files": [("images", ("a.jpg", photo, "image/jpeg"))], "data": {"seed": "-1"}}),
        ("invalid_request", {"json": {"images": ["not base64!"]}}),
        ("invalid_request", {"content": b"{broken", "headers": {"content-type": "application/json"}}),
        ("unsupported_media_type", {"content": b"hello", "headers": {"content-type": "text/plain"}}),
    ]


def good_request(rng: random.Random, pics: list[bytes]) -> tuple[int, dict]:
    """(crops, httpx kwargs): S in {1, 4, 8, 16}, 1-2 photos, both encodings."""
    samples = rng.choice([1, 4, 4, 8, 8, 16])
    images = rng.sample(pics, rng.choice([1, 1, 2]))
    options = {"policy": "center"} if samples == 1 else {"samples": samples, "policy": rng.choice(
        ["crop_flip", "multiscale"]), "seed": rng.randrange(1000)}
    if rng.random() < 0.5:
        return samples * len(images), {"json": {"images": [b64(i) for i in images], **options}}
    files = [("images", (f"{n}.jpg", i, "image/jpeg")) for n, i in enumerate(images)]
    return samples * len(images), {"files": files, "data": {k: str(v) for k, v in options.items()}}


def rss_mb(pid: int) -> float:
    return rss_bytes(pid) / 2**20


def gauge(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


@dataclass
class Tally:
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    good_latency: list[float] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, reply: httpx.Response | None, expected: str | None, elapsed: float, error: str = "") -> None:
        with self.lock:
            if reply is None:
                self.codes[f"client_error:{error}"] += 1
                self.unexpected.append(error)
                return
            kind = "ok" if reply.status_code == 200 else reply.json().get("error", {}).get("type", "?")
            self.codes[f"{reply.status_code} {kind}"] += 1
            if expected is None and reply.status_code == 200:
                self.good_latency.append(elapsed)
            elif expected is not None and kind != expected:
                self.unexpected.append(f"expected {expected}, got {reply.status_code} {kind}")
            elif expected is None and reply.status_code not in (200, 429):
                self.unexpected.append(f"good request got {reply.status_code} {kind}")


def send(client: httpx.Client, tally: Tally, kwargs: dict, expected: str | None) -> None:
    started = time.monotonic()
    try:
        reply = client.post("/v1/embeddings", **kwargs)
    except httpx.HTTPError as exc:
        tally.record(None, expected, time.monotonic() - started, type(exc).__name__)
        return
    tally.record(reply, expected, time.monotonic() - started)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def calibrate(url: str, pics: list[bytes], seconds: float, clients: int) -> float:
    """Served requests/s of the good mix with `clients` closed-loop clients."""
    done = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def loop(seed: int) -> None:
        nonlocal done
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=300) as client:
            while time.monotonic() < stop:
                _, kwargs = good_request(rng, pics)
                if client.post("/v1/embeddings", **kwargs).status_code == 200:
                    with lock:
                        done += 1

    started = time.monotonic()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done / (time.monotonic() - started)


def soak(url: str, pid: int | None, minutes: float, rate: float, bad_fraction: float, seed: int) -> dict:
    rng = random.Random(seed)
    pictures = photos(PHOTOS)
    pics = pictures.images
    bad = bad_requests(pics[0])
    tally = Tally()
    samples: list[tuple[float, float, float]] = []  # (t, rss MB, queue crops)
    stop = threading.Event()
    t0 = time.monotonic()

    def sampler() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                text = client.get("/metrics").text
                samples.append((time.monotonic() - t0, rss_mb(pid) if pid else gauge(
                    text, "process_resident_memory_bytes") / 2**20, gauge(text, "metta_queue_crops")))
                stop.wait(5)

    watcher = threading.Thread(target=sampler)
    watcher.start()
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=300)
        return local.client

    def send_one(kwargs: dict, expected: str | None) -> None:
        send(client(), tally, kwargs, expected)  # client() here: each worker thread keeps its own

    sent = 0
    with ThreadPoolExecutor(max_workers=64) as pool:
        next_at = time.monotonic()
        end = t0 + minutes * 60
        while next_at < end:
            time.sleep(max(0.0, next_at - time.monotonic()))
            if rng.random() < bad_fraction:
                expected, kwargs = rng.choice(bad)
                pool.submit(send_one, kwargs, expected)
            else:
                _, kwargs = good_request(rng, pics)
                pool.submit(send_one, kwargs, None)
            sent += 1
            next_at += rng.expovariate(rate)
    stop.set()
    watcher.join()
    elapsed = time.monotonic() - t0
    after = httpx.get(f"{url}/metrics", timeout=30).text
    lat = tally.good_latency
    return {
        "minutes": round(elapsed / 60, 2), "rate_per_s": round(rate, 3), "photos": pictures.source,
        "requests_sent": sent,
        "served_200": tally.codes.get("200 ok", 0), "replies": dict(sorted(tally.codes.items())),
        "unexpected": tally.unexpected[:20], "unexpected_count": len(tally.unexpected),
        "latency_s": {"p50": round(percentile(lat, 50), 3), "p95": round(percentile(lat, 95), 3),
                      "p99": round(percentile(lat, 99), 3), "max": round(max(lat, default=float("nan")), 3)},
        "rss_mb": {"start": round(samples[0][1]), "end": round(samples[-1][1]),
                   "peak": round(max(s[1] for s in samples))},
        "queue_crops_peak": max(s[2] for s in samples),
        "after": {"inflight": gauge(after, "metta_inflight_requests"), "queue_crops": gauge(after, "metta_queue_crops"),
                  "ready": gauge(after, "metta_ready")},
        "rss_trace_mb": [(round(t), round(r)) for t, r, _ in samples[:: max(1, len(samples) // 24)]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity")
    parser.add_argument("--rate", type=float, default=None, help="requests/s (skips calibration)")
    parser.add_argument("--calibrate-s", type=float, default=60.0)
    parser.add_argument("--bad-fraction", type=float, default=0.1)
    parser.add_argument("--url", default=None, help="an already running server (else one is started)")
    parser.add_argument("--server-args", default="--model efficientnet_lite0",
                        help="flags for the started server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    server = None
    if args.url is None:
        log_dir = Path(tempfile.mkdtemp(prefix="metta-soak-"))
        server = start_server(log_dir, *args.server_args.split())
        url, pid = server.url, server.pid
        print(f"server: {url} pid {pid}, log {server.log_path}", flush=True)
    else:
        url, pid = args.url, None
    try:
        rate = args.rate
        if rate is None:
            capacity = calibrate(url, photos(PHOTOS).images, args.calibrate_s, clients=4)
            rate = args.load * capacity
            print(f"capacity {capacity:.3f} requests/s (closed loop, 4 clients); soaking at {rate:.3f}/s", flush=True)
        report = soak(url, pid, args.minutes, rate, args.bad_fraction, args.seed)
        if server is not None:
            report["server_log_tracebacks"] = server.log().count("Traceback")
            report["server_exit_code"] = server.terminate()
            server = None
    finally:
        if server is not None:
            server.terminate()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    lat = report["latency_s"]
    print(f"\nserved {report['served_200']} of {report['requests_sent']}; p50 {lat['p50']} s, p99 {lat['p99']} s; "
          f"RSS {report['rss_mb']['start']} -> {report['rss_mb']['end']} MB (peak {report['rss_mb']['peak']}); "
          f"unexpected replies: {report['unexpected_count']}")


if __name__ == "__main__":
    main()
