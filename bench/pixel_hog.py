"""One request against the pixel budget: 64 flat 40 MP images, then two good clients for 20 s (issue 21's goal).

    flock /work/.heavy.lock .venv/bin/python bench/pixel_hog.py --format png --out hog.json
    PYTHONPATH=/tmp/base-02c7108 .venv/bin/python bench/pixel_hog.py   # the same against an older tree

A loopback server with the default settings (256 M pixel budget, the default model, 2 threads). First the big
request alone (is it served?), then again with two good clients starting 1 s later, posting sample photos at
S=8 (crop_flip) one after another for 20 s, backing off 50 ms after a refusal. Printed (one JSON line): the big
request's status and time both ways, and the good clients' replies by status, share of 200s and p95.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

from service.testing import photos, start_server


def flat_image(fmt: str, width: int = 8_000, height: int = 5_000) -> bytes:
    """A flat picture: a few hundred KB that decode to 40 MP. A JPEG may be decoded at a reduced scale (its views
    allow 1/8 here); a PNG is always decoded whole."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 90, 60)).save(buffer, fmt, **({"quality": 75} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--format", choices=["jpeg", "png"], default="jpeg", help="the big request's images")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    flat = base64.b64encode(flat_image(args.format.upper())).decode()
    big = {"images": [flat] * 64, "samples": 1, "policy": "center"}
    pictures = photos(40)  # $METTA_SAMPLES_DIR, else ../shared/data/imagenet-sample
    good_images = [base64.b64encode(image).decode() for image in pictures.images]
    server = start_server(Path(tempfile.mkdtemp(prefix="metta-hog-")), "--threads", "2", own_session=True,
                          ready_timeout=600)
    url = server.url + "/v1/embeddings"

    def post_big(into: dict[str, float]) -> None:
        started = time.monotonic()
        with httpx.Client() as client:
            reply = client.post(url, json=big, timeout=600)
        into.update(status=reply.status_code, seconds=round(time.monotonic() - started, 1))

    codes: collections.Counter[int] = collections.Counter()
    latencies: list[float] = []
    lock = threading.Lock()

    def good(worker: int, stop: float) -> None:
        n = 0
        with httpx.Client() as client:
            while time.monotonic() < stop:
                started = time.monotonic()
                image = good_images[(worker * 7 + n) % len(good_images)]
                reply = client.post(url, json={"images": [image], "samples": 8, "policy": "crop_flip"}, timeout=60)
                with lock:
                    codes[reply.status_code] += 1
                    if reply.status_code == 200:
                        latencies.append(time.monotonic() - started)
                if reply.status_code != 200:
                    time.sleep(0.05)
                n += 1

    try:
        alone: dict[str, float] = {}
        post_big(alone)
        with_others: dict[str, float] = {}
        hog = threading.Thread(target=post_big, args=(with_others,))
        hog.start()
        time.sleep(1.0)
        stop = time.monotonic() + args.seconds
        clients = [threading.Thread(target=good, args=(worker, stop)) for worker in range(2)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        hog.join()
    finally:
        server.stop()
    latencies.sort()
    answered = sum(codes.values())
    report = {"format": args.format, "photos": pictures.source, "big_alone": alone,
              "big_with_good_clients": with_others,
              "good_codes": {str(code): count for code, count in sorted(codes.items())},
              "good_200_share": round(codes[200] / answered, 3) if answered else None,
              "good_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 2) if latencies else None}
    text = json.dumps(report)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
