"""A closed-loop HTTP load generator: C clients, each posting its next request as soon as the last returns.

Loopback only, bounded in time and in request count. Every request is one sample photo (synthetic JPEGs of
the same sizes when the photos are absent, said in the output) as JSON
(`{"images": [base64], "samples": S, "policy": "crop_flip", "seed": k}`), the same bytes for every
server under test, prepared before the clock starts. A minimal HTTP/1.1 keep-alive client on raw
asyncio streams keeps the generator's own CPU use low (it shares the machine with the server);
that use is reported too.

    python -m bench.loadgen --url http://127.0.0.1:8000/v1/embeddings --samples 8 --concurrency 16 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from service.testing import SAMPLE_DIR, photos


def json_bodies(images: list[bytes], samples: int, policy: str = "crop_flip") -> list[bytes]:
    return [json.dumps({"images": [base64.b64encode(image).decode("ascii")], "samples": samples,
                        "policy": policy, "seed": i}).encode() for i, image in enumerate(images)]


@dataclass
class LoadResult:
    url: str
    samples: int
    concurrency: int
    seconds: float  # the measured window
    requests: int  # completed with 200 inside the window
    errors: int  # non-200 or transport errors inside the window
    crops_per_s: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    all_count: int  # every 200 reply of the run, warm-up and tail included
    all_mean_ms: float
    client_cpu: float  # cores used by this generator (process CPU seconds / wall seconds)
    status_counts: dict[str, int]


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=2**22)
        assert self.reader is not None
        self.writer.write(head + body)
        header = await self.reader.readuntil(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "content-length" in fields:
            payload = await self.reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            payload = b"".join(part[:-2] for part in parts)
        else:
            payload = await self.reader.read()
            fields["connection"] = "close"
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run_load(url: str, bodies: list[bytes], samples: int, concurrency: int, seconds: float,
                   warmup_s: float = 1.0, max_requests: int = 100_000, timeout_s: float = 60.0,
                   images_per_request: int = 1, max_window_s: float = 20.0) -> LoadResult:
    """Closed loop. Every client's first request is warm-up; the window of `seconds` opens once all have
    had theirs and warmup_s has passed; it lasts `seconds`, stretched to two warm-up latencies (at most
    max_window_s) so a slow closed loop still completes a few rounds inside it. Statistics are over the
    replies completed inside the window;
    `all_*` also count warm-up and tail replies (what a server-side histogram of the whole run sees)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("the load generator only talks to loopback addresses")
    heads = {len(b): (f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(b)}\r\n\r\n").encode() for b in bodies}
    next_body = itertools.cycle(bodies).__next__
    latencies: list[float] = []
    every: list[float] = []  # every 200 reply, warm-up and tail included
    statuses: dict[str, int] = {}
    counter = itertools.count()
    cpu_at: list[float] = []
    warm = asyncio.Event()  # set once every client has had one reply and warmup_s has passed
    warmed: list[int] = []
    slowest: list[float] = []
    window = [0.0, 0.0]
    earliest = time.perf_counter() + warmup_s

    async def client() -> None:
        connection = _Connection(host, port)
        first = True
        try:
            while next(counter) < max_requests:
                if warm.is_set() and time.perf_counter() >= window[1]:
                    break
                body = next_body()
                sent = time.perf_counter()
                try:
                    status, _ = await asyncio.wait_for(connection.request(heads[len(body)], body), timeout_s)
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    connection.close()
                    status = 0
                    statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                    await asyncio.sleep(0.05)
                done = time.perf_counter()
                if status == 200:
                    every.append(done - sent)
                if first:  # the first request of every client is warm-up: it is never counted
                    first = False
                    warmed.append(1)
                    slowest.append(done - sent)
                    if len(warmed) == concurrency:
                        await asyncio.sleep(max(0.0, earliest - time.perf_counter()))
                        # at least ~2 rounds of the closed loop, so bursts of replies average out
                        length = min(max(seconds, 2 * max(slowest)), max(seconds, max_window_s))
                        window[:] = [time.perf_counter(), time.perf_counter() + length]
                        warm.set()
                    continue
                if warm.is_set() and window[0] <= done <= window[1]:  # every reply completed in the window
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                    if status == 200:
                        latencies.append(done - sent)
        finally:
            connection.close()

    async def cpu_marks() -> None:
        await warm.wait()
        cpu_at.append(time.process_time())
        await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
        cpu_at.append(time.process_time())

    marks = asyncio.ensure_future(cpu_marks())
    await asyncio.gather(*(client() for _ in range(concurrency)))
    if not warm.is_set():  # max_requests reached before every client warmed up
        marks.cancel()
        window[:] = [earliest, time.perf_counter()]
    else:
        await marks
    measured = window[1] - window[0]
    ok = len(latencies)
    completed = ok
    ms = sorted(1000 * x for x in latencies)

    def pct(q: float) -> float:
        return ms[min(len(ms) - 1, int(q * len(ms)))] if ms else float("nan")

    return LoadResult(url=url, samples=samples, concurrency=concurrency, seconds=measured, requests=ok,
                      errors=sum(v for k, v in statuses.items() if k != "200"),
                      crops_per_s=completed * samples * images_per_request / measured,
                      images_per_s=completed * images_per_request / measured,
                      p50_ms=statistics.median(ms) if ms else float("nan"), p95_ms=pct(0.95), p99_ms=pct(0.99),
                      mean_ms=statistics.fmean(ms) if ms else float("nan"),
                      all_count=len(every), all_mean_ms=1000 * statistics.fmean(every) if every else float("nan"),
                      client_cpu=(cpu_at[1] - cpu_at[0]) / measured if len(cpu_at) == 2 else float("nan"),
                      status_counts=statuses)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000/v1/embeddings (loopback only)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--images-dir", type=Path, default=SAMPLE_DIR)
    args = parser.parse_args(argv)
    pictures = photos(directory=args.images_dir)
    if pictures.source == "synthetic":
        print(f"no photos in {args.images_dir}: {len(pictures)} synthetic JPEGs of the same sizes", file=sys.stderr)
    result = asyncio.run(run_load(args.url, json_bodies(pictures.images, args.samples), args.samples,
                                  args.concurrency, args.seconds, args.warmup, args.max_requests))
    print(json.dumps({**asdict(result), "photos": pictures.source}, indent=1))


if __name__ == "__main__":
    main()
