"""Auto S against fixed S=32 on a real server: the `auto` part of `python -m bench.goals` (docs/benchmarks.md).

- `with_deadlines`: the default model past 2x overload (16 clients), fixed S=32 against `samples: "auto"`
  (4 … 32) with a deadline of four times a lone S=32 request's latency.
- `without_deadlines`: no `timeout_ms` at all, `--max-queue-crops 256`, 32 clients in a closed loop, fixed S=32
  against auto [4, 32]; then 8 clients pacing themselves at half of what fixed S=32 served, auto against fixed
  S=32 with the same images and seeds.
Each reports images/s, the replies by status, the S given and the cosine of auto embeddings to the same images'
S=32 means. Clients honour `Retry-After`.
"""

from __future__ import annotations

import base64
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service.testing import start_server

Reply = tuple[int, int, int, "np.ndarray | None"]  # (status, image, seed, embedding)


class AutoLoad:
    """Clients posting one image at a time to a server's /v1/embeddings, crop_flip, seeds by client and turn."""

    def __init__(self, url: str, images: list[str]) -> None:
        self.url = url + "/v1/embeddings"
        self.images = images

    def post(self, client: httpx.Client, index: int, seed: int, **options: Any) -> httpx.Response:
        return client.post(self.url, json={"images": [self.images[index]], "policy": "crop_flip", "seed": seed,
                                           "encoding": "base64", **options}, timeout=120)

    @staticmethod
    def vector(reply: httpx.Response) -> np.ndarray:
        return np.frombuffer(base64.b64decode(reply.json()["data"][0]["embedding"]), "<f4")

    def load(self, options: dict[str, Any], clients: int, seconds: float, *, warmup_s: float = 0.0,
             pace_s: float | None = None) -> dict[str, Any]:
        """`clients` in a closed loop for `warmup_s` + `seconds`; only replies to requests sent after the warm-up
        count (`whole_run` has the codes of all). `pace_s`: each client sends at most one request per pace_s
        (starts staggered), else the next as soon as its reply is in."""
        replies: list[Reply] = []
        samples_given: list[int] = []
        codes: dict[str, int] = {}
        whole_run: dict[str, int] = {}
        errors: dict[str, int] = {}  # error type and message → count
        lock = threading.Lock()
        started = time.monotonic()
        measured_from, stop = started + warmup_s, started + warmup_s + seconds

        def client_loop(worker: int) -> None:
            with httpx.Client() as client:
                n = 0
                if pace_s:
                    time.sleep(worker * pace_s / clients)
                while (sent := time.monotonic()) < stop:
                    index, seed = (worker * 7 + n) % len(self.images), worker * 1000 + n
                    reply = self.post(client, index, seed, **options)
                    status = str(reply.status_code)
                    with lock:
                        whole_run[status] = whole_run.get(status, 0) + 1
                        if sent >= measured_from:
                            codes[status] = codes.get(status, 0) + 1
                            if reply.status_code == 200:
                                replies.append((reply.status_code, index, seed, self.vector(reply)))
                                samples_given.append(reply.json()["samples"])
                            else:
                                error = reply.json()["error"]
                                key = f"{status} {error['type']}: {error['message'][:90]}"
                                errors[key] = errors.get(key, 0) + 1
                    if reply.status_code == 429:  # as a client should: back off for the Retry-After it was given
                        time.sleep(float(reply.headers.get("retry-after", 1)))
                    elif pace_s:
                        time.sleep(max(0.0, sent + pace_s - time.monotonic()))
                    n += 1

        threads = [threading.Thread(target=client_loop, args=(w,)) for w in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - measured_from  # the last replies come in after `stop`: counted in the wall
        answered = sum(codes.values())
        return {"replies": replies, "images_per_s": codes.get("200", 0) / wall, "codes": codes,
                "refused_share": codes.get("429", 0) / answered if answered else float("nan"),
                "whole_run_codes": whole_run, "errors": errors,
                "samples": {str(s): samples_given.count(s) for s in sorted(set(samples_given))},
                "median_samples": statistics.median(samples_given) if samples_given else float("nan")}

    def cosines_to_s32(self, replies: list[Reply], count: int = 40) -> dict[str, float]:
        """Cosine of up to `count` auto embeddings (evenly sampled) to the same image's S=32 mean, same seed."""
        cosines = []
        done = [r for r in replies if r[3] is not None]
        with httpx.Client() as client:
            for _, index, seed, embedding in done[:: max(1, len(done) // count)]:
                assert embedding is not None
                full = self.vector(self.post(client, index, seed, samples=32))
                cosines.append(float(embedding @ full / (np.linalg.norm(embedding) * np.linalg.norm(full))))
        return {"count": len(cosines), "min": min(cosines, default=float("nan")),
                "median": statistics.median(cosines) if cosines else float("nan")}


def _timed(call: Any) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _strip(run: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in run.items() if key != "replies"}


def with_deadlines(images: list[str], threads: int, seconds: float, logs: Path) -> dict[str, Any]:
    """16 clients (far past 2x what one server carries at S=32), auto with a deadline of four lone S=32 latencies."""
    server = start_server(logs, "--threads", str(threads), name="auto", own_session=True, ready_timeout=600)
    bench = AutoLoad(server.url, images)
    try:
        with httpx.Client() as client:
            bench.post(client, 0, 0, samples=32)
            lone = statistics.median(_timed(lambda: bench.post(client, 0, 0, samples=32)) for _ in range(3))
        clients = 16
        fixed = bench.load({"samples": 32}, clients, seconds)
        auto = bench.load({"samples": "auto", "samples_min": 4, "samples_max": 32, "timeout_ms": round(4000 * lone)},
                          clients, seconds)
        cosines = bench.cosines_to_s32(auto["replies"])
    finally:
        server.stop()
    return {"lone_s32_seconds": lone, "clients": clients, "fixed_s32": _strip(fixed), "auto_4_32": _strip(auto),
            "images_per_s_ratio": auto["images_per_s"] / fixed["images_per_s"], "cosine_to_s32": cosines}


def without_deadlines(images: list[str], threads: int, seconds: float, logs: Path, *,
                      warmup_s: float = 5.0) -> dict[str, Any]:
    """No `timeout_ms`, a 256-crop queue: 32 clients, fixed S=32 against auto [4, 32]; then 8 clients pacing
    themselves at half what fixed S=32 served, auto against fixed S=32 with the same images and seeds."""
    server = start_server(logs, "--threads", str(threads), "--max-queue-crops", "256", "--max-request-crops", "256",
                          name="auto-nodeadline",
                          own_session=True, ready_timeout=600)
    bench = AutoLoad(server.url, images)
    auto_options = {"samples": "auto", "samples_min": 4, "samples_max": 32}
    try:
        with httpx.Client() as client:
            bench.post(client, 0, 0, samples=32)
        fixed = bench.load({"samples": 32}, 32, seconds, warmup_s=warmup_s)
        auto = bench.load(auto_options, 32, seconds, warmup_s=warmup_s)
        cosines = bench.cosines_to_s32(auto["replies"])
        # Half of what the server carries at S=32 (fixed S=32's images/s above), spread over 8 pacing clients.
        pace_s = 8 / (0.5 * fixed["images_per_s"])
        paced_auto = bench.load(auto_options, 8, seconds * 1.5, pace_s=pace_s)
        paced_fixed = bench.load({"samples": 32}, 8, seconds * 1.5, pace_s=pace_s)
    finally:
        server.stop()
    fixed_by_key = {(index, seed): vector for _, index, seed, vector in paced_fixed["replies"]}
    pairs = [(vector, fixed_by_key[(index, seed)]) for _, index, seed, vector in paced_auto["replies"]
             if (index, seed) in fixed_by_key]
    at_32 = paced_auto["samples"].get("32", 0)
    served = sum(paced_auto["samples"].values())
    return {
        "clients": 32, "max_queue_crops": 256, "warmup_s": warmup_s, "fixed_s32": _strip(fixed),
        "auto_4_32": _strip(auto), "images_per_s_ratio": auto["images_per_s"] / fixed["images_per_s"],
        "cosine_to_s32": cosines,
        "paced": {"clients": 8, "pace_s": pace_s, "auto_4_32": _strip(paced_auto), "fixed_s32": _strip(paced_fixed),
                  "auto_at_s32_share": at_32 / served if served else float("nan"),
                  "same_seed_pairs": len(pairs), "same_seed_identical": sum(np.array_equal(a, f) for a, f in pairs),
                  "same_seed_max_abs_diff": max((float(np.abs(a - f).max()) for a, f in pairs), default=float("nan"))},
    }
