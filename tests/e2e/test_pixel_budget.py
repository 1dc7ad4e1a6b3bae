"""Memory bounded in pixels: panoramas at concurrency 32 against a real server keep RSS under the settings' bound.

A 256 × 12,000 px strip compresses to a few KB but decodes to 9 MB; before the pixel budget and the cut of
the working copy to the views' boxes, every queued one held its whole strip (≈ 1 GB for this test's load).
The bound the settings promise (docs/reliability.md): RSS ≤ idle RSS + 13 B × max_queue_pixels (3-byte
working copies; an image being decoded peaks at ≈ 13 B per header pixel, all counted from its header)
+ 2 × max_inflight_body_bytes + a fixed allowance for the batches being rendered and the connections,
with glibc's mmap threshold fixed (`MALLOC_MMAP_THRESHOLD_`, as the container image sets it).
"""

from __future__ import annotations

import io
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.testing import ServerProcess, start_server

MAX_QUEUE_PIXELS = 12_000_000
MAX_BODY_BYTES = 4_000_000
MAX_INFLIGHT_BODY_BYTES = 8_000_000
ALLOWANCE_MB = 120  # render batches in flight, connections, the allocator's own
LONG_SIDE = 40_000  # 256 × 40,000 = 10.2 MP (29 MB decoded) for one crop: pixels pile up, crops do not
CLIENTS, SECONDS, CLIENT_TIMEOUT_S = 32, 15.0, 30.0
# glibc's default raises its mmap threshold after the first big free, so later big images come from
# per-thread arenas and freed ones stay in RSS; a fixed threshold returns them (docs/reliability.md).
SERVER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)}


def rss_mb(server: ServerProcess) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) / 1024


def scrape(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def panorama(fmt: str, seed: int, height: int = 256, width: int = LONG_SIDE) -> bytes:
    """A smooth strip, varying only along its length (tiny when compressed, huge decoded); PNG or JPEG."""
    length = max(height, width)
    t = np.linspace(0, 1, length)[:, None]
    line = (127 + 120 * np.sin(2 * np.pi * t * (2 + seed) * np.array([1.0, 1.5, 2.0]))).astype(np.uint8)
    pixels = np.repeat(line[None], height, axis=0) if width >= height else np.repeat(line[:, None], width, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **({"quality": 75} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def test_panoramas_at_concurrency_32_keep_rss_under_the_pixel_bound(tmp_path: Path) -> None:
    # A slow forward (0.5 s a crop) and one central crop per strip: before the budget and the cut, every
    # decoded strip waited in the queue whole (32 × 29 MB); now each holds a 224 × 224 square once decoded.
    server = start_server(
        tmp_path, "--model", "sleep:500000", "--mode", "eager", "--threads", "1", "--decode-workers", "2",
        "--max-queue-pixels", str(MAX_QUEUE_PIXELS), "--max-body-bytes", str(MAX_BODY_BYTES),
        "--max-inflight-body-bytes", str(MAX_INFLIGHT_BODY_BYTES), "--max-image-side", str(LONG_SIDE),
        "--request-timeout-s", "60", env=SERVER_ENV)
    try:
        images = [panorama("PNG", 0), panorama("JPEG", 1, LONG_SIDE, 256), panorama("PNG", 2, LONG_SIDE, 256),
                  panorama("JPEG", 3)]
        assert max(len(image) for image in images) < 1_000_000, [len(image) for image in images]
        with httpx.Client(base_url=server.url, timeout=30) as client:  # warm the allocator before the baseline
            reply = client.post("/v1/embeddings", files=[("images", ("p.png", images[0]))],
                                data={"policy": "center", "samples": "1"})
            assert reply.status_code == 200, reply.text
        idle_mb = rss_mb(server)
        bound_mb = idle_mb + (13 * MAX_QUEUE_PIXELS + 2 * MAX_INFLIGHT_BODY_BYTES) / 2**20 + ALLOWANCE_MB
        statuses: list[int] = []
        peak_mb = idle_mb
        stop = time.monotonic() + SECONDS

        def client_loop(index: int) -> None:
            """Until this client's strip is embedded once (or time is up), retrying after each 429."""
            files = [("images", ("strip", images[index % len(images)]))]
            with httpx.Client(base_url=server.url, timeout=CLIENT_TIMEOUT_S) as client:
                while time.monotonic() < stop:
                    reply = client.post("/v1/embeddings", files=files, data={"policy": "center", "samples": "1"})
                    statuses.append(reply.status_code)
                    if reply.status_code != 429:
                        return
                    assert reply.headers.get("retry-after"), reply.text
                    time.sleep(0.2)

        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            peak_mb = max(peak_mb, rss_mb(server))
            time.sleep(0.02)
        for thread in threads:
            thread.join()
        overloaded = scrape(server, 'metta_rejected_total{reason="overloaded"}')
        ok, refused = statuses.count(200), statuses.count(429)
        took = time.monotonic() - stop + SECONDS
        print(f"\npixel budget: {ok} x 200, {refused} x 429, RSS idle {idle_mb:.0f} MB, peak {peak_mb:.0f} MB, "
              f"bound {bound_mb:.0f} MB, overloaded counted {overloaded:.0f}, {took:.1f} s")
        assert set(statuses) <= {200, 429}, sorted(set(statuses))
        assert ok >= 5, f"only {ok} requests served"
        assert refused > 0 and overloaded >= refused, (refused, overloaded)
        assert peak_mb <= bound_mb, f"RSS peaked at {peak_mb:.0f} MB, over the promised {bound_mb:.0f} MB"
        assert scrape(server, "metta_queue_crops") == 0
    finally:
        assert server.terminate() == 0, server.log()
