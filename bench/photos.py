"""The `photos` part: 12 MP camera photos through the service and `metta embed`, side by side with another tree.

    python -m bench.photo_set --out /tmp/photo-set --count 40             # the files (see bench/photo_set.py)
    git worktree add /tmp/base 02c7108                                   # the tree to compare with
    python -m bench.photos --files /tmp/photo-set --baseline /tmp/base --seconds 15 --repeats 3 --embed-files 200

Per tree (this one, `--baseline`): a server from that tree (`python -m service` in it, efficientnet_lite0 on
the CPU), closed loops of `--clients` posting one photo per request to `/v1/embeddings` at its defaults
(multiscale S=3) and to `/v1/classify` at its defaults (crop_flip S=10), the trees alternating in each
repeat, the other server frozen (SIGSTOP) meanwhile; then `metta embed` over `--embed-files` of the photos
(hard links to the set's files under distinct names), timed wall to wall (`--no-service`: only these). R:
the raw forward limit (OpenVINO, batch 32) in the same run; `/v1/embeddings` is also reported against R/3.
Medians of `--repeats`. Loopback only; servers stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.loadgen import run_load
from service.testing import REPO, ServerProcess, free_port

PHOTO_SUFFIXES = (".jpg",)


def start_tree_server(tree: Path, log_dir: Path, name: str, threads: int) -> ServerProcess:
    """`python -m service` run inside `tree` (its own code first on sys.path), ready once /readyz says 200."""
    port = free_port()
    log_path = log_dir / f"{name}-{port}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--model", "efficientnet_lite0", "--device", "cpu", "--threads",
         str(threads), "--host", "127.0.0.1", "--port", str(port)],
        cwd=tree, stdout=log_file, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"})
    return ServerProcess(name, process, port, log_path, log_file, False).wait_ready("/readyz", 300)


def bodies(files: list[Path]) -> list[bytes]:
    """One photo per request, the endpoint's defaults (no samples, no policy)."""
    return [json.dumps({"images": [base64.b64encode(path.read_bytes()).decode()], "seed": i}).encode()
            for i, path in enumerate(files)]


def embed_run(tree: Path, folder: Path, out: Path, workers: int) -> tuple[float, float]:
    """`metta embed FOLDER` with `tree`'s code: images per second, wall to wall (the model load included), and
    the peak resident memory in MB of its largest process (the kernel's `ru_maxrss` of the run, from wait4)."""
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-c", "from service.cli import main; main()", "embed", str(folder), "--out", str(out),
               "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = threading.Timer(1800, process.kill)
    deadline.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        deadline.cancel()
    elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command)
    return len(list(folder.iterdir())) / elapsed, usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=Path, required=True, help="a folder written by bench.photo_set")
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout (a git worktree)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--embed-files", type=int, default=200, help="0: no metta embed runs")
    parser.add_argument("--no-service", action="store_true", help="only the metta embed runs (and no R)")
    parser.add_argument("--out", type=Path, default=None, help="results.json")
    args = parser.parse_args(argv)
    files = sorted(p for p in args.files.iterdir() if p.suffix in PHOTO_SUFFIXES)
    from bench.raw_limit import measure

    r_crops = 0.0
    if not args.no_service:
        raw = measure("efficientnet_lite0", ("openvino",), (32,), ("float32",), args.threads, 1.5, "cpu", False)
        r_crops = float(raw["R"]["float32"]["crops_per_s"])
        print(f"R = {r_crops:.1f} crops/s (R/3 = {r_crops / 3:.1f} images/s)", flush=True)
    trees = {"this": REPO, "baseline": args.baseline.resolve()}
    posts = bodies(files)
    results: dict[str, Any] = {"R_crops_per_s": r_crops, "files": len(files), "clients": args.clients, "runs": []}
    with tempfile.TemporaryDirectory(prefix="metta-photos-") as scratch:
        log_dir = Path(scratch)
        servers = {} if args.no_service else {name: start_tree_server(tree, log_dir, name, args.threads)
                                                for name, tree in trees.items()}
        try:
            for repeat in range(0 if args.no_service else args.repeats):
                for endpoint, crops in (("/v1/embeddings", 3), ("/v1/classify", 10)):
                    for name, server in servers.items():
                        others = [s for n, s in servers.items() if n != name]
                        for other in others:
                            other.pause()
                        try:
                            load = asyncio.run(run_load(server.url + endpoint, posts, crops, args.clients,
                                                        args.seconds, 2.0, max_requests=5_000))
                        finally:
                            for other in others:
                                other.resume()
                        row = {"tree": name, "endpoint": endpoint, "repeat": repeat,
                               "images_per_s": load.images_per_s, "p50_ms": load.p50_ms, "errors": load.errors,
                               "client_cpu": load.client_cpu}
                        results["runs"].append(row)
                        print(json.dumps(row), flush=True)
        finally:
            for server in servers.values():
                server.stop()
        if args.embed_files:
            folder = log_dir / "embed-input"
            folder.mkdir()
            for index in range(args.embed_files):  # distinct names, one inode per set file
                source = files[index % len(files)]
                os.link(source, folder / f"{index:05d}{source.suffix}")
            for repeat in range(args.repeats):
                for name, tree in trees.items():
                    rate, peak_mb = embed_run(tree, folder, log_dir / f"embed-{name}.parquet", workers=args.threads)
                    row = {"tree": name, "endpoint": "metta embed", "repeat": repeat, "images_per_s": rate,
                           "peak_rss_mb": peak_mb}
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
    summary = {}
    for endpoint in ("/v1/embeddings", "/v1/classify", "metta embed"):
        rates = {name: statistics.median(r["images_per_s"] for r in results["runs"]
                                         if r["tree"] == name and r["endpoint"] == endpoint)
                 for name in trees if any(r["endpoint"] == endpoint for r in results["runs"])}
        if rates:
            summary[endpoint] = {**rates, "ratio": rates["this"] / rates["baseline"]}
            print(f"{endpoint}: this {rates['this']:.2f} img/s, baseline {rates['baseline']:.2f} img/s, "
                  f"ratio {rates['this'] / rates['baseline']:.2f}", flush=True)
    peaks = {name: max(r["peak_rss_mb"] for r in results["runs"] if r["tree"] == name and "peak_rss_mb" in r)
             for name in trees if any("peak_rss_mb" in r for r in results["runs"])}
    if peaks:
        summary["metta embed"]["peak_rss_mb"] = peaks
        print(f"metta embed peak RSS of its largest process: this {peaks['this']:.0f} MB, "
              f"baseline {peaks['baseline']:.0f} MB", flush=True)
    if r_crops and "/v1/embeddings" in summary:  # the goal's other yardstick: R/3 images/s (S=3 views an image)
        summary["/v1/embeddings"]["this_over_R_3"] = summary["/v1/embeddings"]["this"] / (r_crops / 3)
        print(f"/v1/embeddings: this / (R/3) = {summary['/v1/embeddings']['this_over_R_3']:.2f}", flush=True)
    results["summary"] = summary
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
