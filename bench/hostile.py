"""Hostile and legitimate unusual images against the decoder and a running server (issue 21's goals).

    python -m bench.hostile bytes-per-pixel   # peak bytes a pixel of each mode's decode path (20 MP, 3 runs)
    python -m bench.hostile isolation         # what decoding in the killable child process costs per image
    python -m bench.hostile attack NAME       # NAME: bmp-rle | tiff-strips | float-tiff | icc | legit

An attack starts its own loopback server (`python -m service` with --server-flags), two good clients
posting the sample photos at S=8 (JSON, one image a request), warms up 5 s, then runs the attack's loops
beside them and prints one JSON line: the good clients' statuses and p50/p95 during the attack, the server
tree's RSS before, at its peak and 5 s after, its CPU (fraction of a core) in the 15 s after, whether it is
still alive. `legit` posts each legitimate unusual file once and reports its status and the cosine of its
embedding to its plain-RGB PNG twin's.

Run from the repository root under the shared lock (`flock /work/.heavy.lock ...`); docs/benchmarks.md has
the commands and the results.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PIXELS = 5_000 * 4_000  # 20 MP: far above what imports and warm-up leave in the peak RSS


def _encode(image: object, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)  # type: ignore[attr-defined]
    return buffer.getvalue()


def mode_files() -> dict[str, bytes]:
    """One 20 MP file per mode Pillow decodes to (JPEG where the mode has one, else PNG or TIFF)."""
    from PIL import Image

    from service.hostile import gradient

    rgb = Image.fromarray(np.tile(gradient(500, 400), (10, 10, 1)))
    grey = rgb.convert("L")
    wide = np.asarray(grey).astype(np.uint16) * 257
    rgba = rgb.copy()
    rgba.putalpha(grey)
    return {
        "RGB": _encode(rgb, "JPEG", quality=90), "L": _encode(grey, "JPEG", quality=90),
        "CMYK": _encode(rgb.convert("CMYK"), "JPEG", quality=90), "P": _encode(rgb.convert("P"), "PNG"),
        "1": _encode(grey.convert("1"), "PNG"), "RGBA": _encode(rgba, "PNG"), "LA": _encode(rgba.convert("LA"), "PNG"),
        "I;16": _encode(Image.fromarray(wide), "PNG"),
        "I": _encode(Image.fromarray(wide.astype(np.int32), "I"), "TIFF", compression="tiff_adobe_deflate"),
        "F": _encode(Image.fromarray(wide.astype(np.float32) / 65535, "F"), "TIFF", compression="tiff_adobe_deflate"),
    }


def _peak_of_one_decode(path: str) -> None:
    """In a fresh process: bytes per pixel the decode of one file added to the peak RSS."""
    import gc

    from service.core.decode import decode_image

    data = Path(path).read_bytes()
    gc.collect()
    with open("/proc/self/statm") as statm:
        before = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    image = decode_image(data, max_pixels=40_000_000, max_side=12_000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"bytes_per_pixel": (peak - before) / (image.shape[1] * image.shape[2])}))


def bytes_per_pixel(out: Path) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for mode, data in mode_files().items():
        path = out / f"mode-{mode.replace(';', '_')}.bin"
        path.write_bytes(data)
        runs = []
        for _ in range(3):
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
            line = subprocess.run([sys.executable, "-m", "bench.hostile", "_peak", str(path)], check=True,
                                  capture_output=True, text=True, env=env)
            runs.append(json.loads(line.stdout.strip().splitlines()[-1])["bytes_per_pixel"])
        figures[mode] = round(float(np.median(runs)), 1)
        print(mode, figures[mode], flush=True)
    return figures


def isolation_cost() -> dict[str, dict[str, float]]:
    """ms per image decoded in the thread and in the isolated child (every format sent there), medians of 3
    passes, on the sample photos (as JPEG and as PNG), a 12 MP JPEG and a 3 MP PNG made from one of them."""
    import time

    from PIL import Image

    from service.core.decode import SizeLimits, decode_image
    from service.core.isolation import IsolatedDecoder
    from service.testing import photos

    class Everything(IsolatedDecoder):
        @staticmethod
        def applies(image_format: str | None, progressive: bool) -> bool:
            return True

    limits: SizeLimits = {"max_pixels": 40_000_000, "max_side": 12_000}
    sample = photos(60).images
    big = Image.open(io.BytesIO(sample[0])).convert("RGB").resize((4032, 3024))
    sets = {"sample photos, JPEG": sample,
            "sample photos, PNG": [_encode(Image.open(io.BytesIO(d)).convert("RGB"), "PNG") for d in sample[:30]],
            "12 MP JPEG q92": [_encode(big, "JPEG", quality=92)] * 6,
            "3 MP PNG": [_encode(big.resize((2016, 1512)), "PNG")] * 6}
    isolated = Everything(60.0)
    figures = {}
    try:
        for name, files in sets.items():
            for data in files[:2]:  # the child started, the caches warm
                decode_image(data, **limits, isolation=isolated)
            row = {}
            for way, options in (("thread_ms", {}), ("isolated_ms", {"isolation": isolated})):
                passes = []
                for _ in range(3):
                    started = time.perf_counter()
                    for data in files:
                        decode_image(data, **limits, **options)  # type: ignore[arg-type]
                    passes.append((time.perf_counter() - started) / len(files) * 1000)
                row[way] = round(float(np.median(passes)), 2)
            row["added_ms"] = round(row["isolated_ms"] - row["thread_ms"], 2)
            figures[name] = row
            print(name, row, flush=True)
    finally:
        isolated.close()
    return figures


def _attack_file(name: str, index: int) -> bytes:
    """The index-th request's image of an attack (the same file but for `icc`: 64 distinct profiles)."""
    from service import hostile

    if name == "icc":
        return hostile.jpeg_with_profile(hostile.padded_profile(15 * 2**20, seed=index))
    if name not in _CACHE:
        makers: dict[str, Callable[[], bytes]] = {
            "bmp-rle": hostile.bmp_rle8_bomb, "tiff-strips": hostile.tiff_many_strips, "float-tiff": hostile.float_tiff}
        _CACHE[name] = makers[name]()
    return _CACHE[name]


ATTACKS = {"bmp-rle": (8, 30.0), "tiff-strips": (2, 20.0), "float-tiff": (2, 20.0), "icc": (2, 0.0)}  # loops, s
_CACHE: dict[str, bytes] = {}


def _post(url: str, image: bytes, samples: int = 8, timeout: float = 120.0) -> tuple[int, float, list[float] | None]:
    import base64
    import http.client
    import time
    import urllib.parse

    body = json.dumps({"images": [base64.b64encode(image).decode()], "samples": samples, "seed": 1}).encode()
    parsed = urllib.parse.urlparse(url)
    started = time.perf_counter()
    connection = http.client.HTTPConnection(parsed.netloc, timeout=timeout)
    try:
        connection.request("POST", "/v1/embeddings", body, {"content-type": "application/json"})
        reply = connection.getresponse()
        payload = reply.read()
        status = reply.status
    except OSError:
        return 0, time.perf_counter() - started, None
    finally:
        connection.close()
    embedding = json.loads(payload)["data"][0]["embedding"] if status == 200 else None
    return status, time.perf_counter() - started, embedding


def _cpu_seconds(pids: list[int]) -> float:
    from service.testing import _stat_fields

    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def attack(name: str, flags: list[str], out: Path) -> dict[str, Any]:
    import threading
    import time

    from service.testing import descendants, photos, start_server, tree_memory

    out.mkdir(parents=True, exist_ok=True)
    server = start_server(out, *flags, own_session=True)
    good_images = photos(60).images
    stop_good = threading.Event()
    good: list[tuple[float, int, float]] = []  # (when it ended, status, seconds)

    def good_client(offset: int) -> None:
        i = offset
        while not stop_good.is_set():
            status, seconds, _ = _post(server.url, good_images[i % len(good_images)])
            good.append((time.monotonic(), status, seconds))
            i += 2

    try:
        if name == "legit":
            return {"legit": legit_files(server.url)}
        loops, seconds = ATTACKS[name]
        clients = [threading.Thread(target=good_client, args=(k,), daemon=True) for k in range(2)]
        for client in clients:
            client.start()
        time.sleep(5.0)
        idle = tree_memory(server.process.pid)
        before = idle.rss
        peak, server_peak = [before], [idle.own_rss]
        attack_statuses: list[int] = []
        stop_attack = threading.Event()
        started = time.monotonic()
        count = [0]

        def attacker() -> None:
            while not stop_attack.is_set():
                with lock:
                    index = count[0]
                    count[0] += 1
                if seconds == 0.0 and index >= 64:  # icc: 64 distinct files in all
                    return
                status, _, _ = _post(server.url, _attack_file(name, index), samples=1)
                attack_statuses.append(status)

        lock = threading.Lock()
        attackers = [threading.Thread(target=attacker, daemon=True) for _ in range(loops)]
        for thread in attackers:
            thread.start()
        while any(t.is_alive() for t in attackers) and (seconds == 0.0 or time.monotonic() - started < seconds):
            now = tree_memory(server.process.pid)
            peak.append(now.rss)
            server_peak.append(now.own_rss)
            time.sleep(0.25)
        stop_attack.set()
        for thread in attackers:
            thread.join(timeout=180)
        ended = time.monotonic()
        during = [s for when, status, s in good if started <= when <= ended]
        statuses = [status for when, status, s in good if started <= when <= ended]
        stop_good.set()
        for client in clients:
            client.join(timeout=120)
        time.sleep(max(0.0, ended + 5.0 - time.monotonic()))
        settled = tree_memory(server.process.pid)
        after_5s = settled.rss
        tree = [server.process.pid, *descendants(server.process.pid)]
        cpu_start = _cpu_seconds(tree)
        time.sleep(15.0)
        cpu = (_cpu_seconds(tree) - cpu_start) / 15.0
        return {
            "attack": name, "loops": loops, "attack_s": round(ended - started, 1),
            "attack_statuses": {str(k): attack_statuses.count(k) for k in sorted(set(attack_statuses))},
            "good_requests": len(during), "good_statuses": {str(k): statuses.count(k) for k in sorted(set(statuses))},
            "good_p50_s": round(float(np.percentile(during, 50)), 3) if during else None,
            "good_p95_s": round(float(np.percentile(during, 95)), 3) if during else None,
            "rss_before_mb": before // 2**20, "rss_peak_added_mb": (max(peak) - before) // 2**20,
            "rss_after_5s_added_mb": (after_5s - before) // 2**20,
            # the server process alone (the rest is its decode children)
            "server_rss_peak_added_mb": (max(server_peak) - idle.own_rss) // 2**20,
            "server_rss_after_5s_added_mb": (settled.own_rss - idle.own_rss) // 2**20,
            "cpu_cores_15s_after": round(cpu, 3), "alive": server.process.poll() is None,
        }
    finally:
        stop_good.set()
        server.terminate()


def legit_files(url: str) -> dict[str, dict[str, Any]]:
    """Each legitimate unusual file and its plain-RGB PNG twin (the pixels a person sees): status, cosine."""
    from PIL import Image

    from service import hostile

    grey = (np.tile(hostile.gradient(500, 400)[..., 0], (1, 1)) // 16 * 16).astype(np.uint8)
    grey_rgb = np.repeat(grey[..., None], 3, axis=2)
    apng = hostile.apng(2_000)  # 64 × 48 frames, ≈ 0.8 MB
    big_profile = hostile.jpeg_with_profile(hostile.padded_profile(2**20), (500, 400))
    cases = {
        "small RLE8 BMP": (hostile.bmp_rle8(grey), grey_rgb),
        "16-bit TIFF": (_encode(Image.fromarray(grey.astype(np.uint16) * 257), "TIFF"), grey_rgb),
        "float TIFF": (_encode(Image.fromarray(grey.astype(np.float32) / 255, "F"), "TIFF"), grey_rgb),
        "2,000-frame APNG": (apng, hostile.gradient()),
        "JPEG + 1 MB ICC profile": (big_profile, np.asarray(Image.open(io.BytesIO(big_profile)).convert("RGB"))),
    }
    figures = {}
    for name, (data, twin) in cases.items():
        status, _, embedding = _post(url, data, samples=8)
        _, _, reference = _post(url, _encode(Image.fromarray(twin), "PNG"), samples=8)
        cosine = None
        if embedding is not None and reference is not None:
            a, b = np.asarray(embedding), np.asarray(reference)
            cosine = round(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), 5)
        figures[name] = {"status": status, "bytes": len(data), "cosine_to_rgb_twin": cosine}
        print(name, figures[name], flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part")
    parser.add_argument("args", nargs="*")
    parser.add_argument("--out", type=Path, default=Path("/tmp/metta-hostile"))
    parser.add_argument("--server-flags", default="", help="flags for python -m service (one string)")
    args = parser.parse_args()
    if args.part == "_peak":
        _peak_of_one_decode(args.args[0])
    elif args.part == "bytes-per-pixel":
        print(json.dumps(bytes_per_pixel(args.out)))
    elif args.part == "isolation":
        print(json.dumps(isolation_cost()))
    elif args.part == "attack":
        print(json.dumps(attack(args.args[0], args.server_flags.split(), args.out)))
    else:
        parser.error(f"unknown part {args.part}")


if __name__ == "__main__":
    main()
