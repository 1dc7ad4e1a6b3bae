"""`metta embed FOLDER --out OUT.parquet` measured against its goals (docs/benchmarks.md, "Bulk embedding").

    python -m bench.bulk --images 10000 --out /tmp/bulk.json

1. A folder of N images: the sample photos ($METTA_SAMPLES_DIR) re-encoded at varied sizes
   (0.4x to 1.6x), or synthetic JPEGs of their sizes when the photos are absent (`"photos": "synthetic"`).
2. The library: `embed()` over the same files in chunks of 64, decode included (one thread, as a user's loop).
3. `metta embed` locally: images/s, and the peak RSS of its process tree minus its RSS right after the
   model loaded (the dataset folder appears right after the load, so that is when the baseline is read).
4. Kill -9 once some parts are written, then the same command: rows kept, rows redone, duplicates.
   The killed run's own count comes from its progress bar (it runs on a pseudo-terminal).
5. A metta-serve process: its saturated crops/s under the closed-loop load generator, then
   `metta embed --server` over the same folder.
All at the default policy and S (multiscale, 3) and the default model unless told otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import io
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from bench.loadgen import json_bodies, run_load
from service.testing import REPO, SYNTHETIC_SIZES, TreeMemory, sample_paths, start_server, synthetic_photos, tree_memory

_SUMMARY = re.compile(r"(\d+) embedded, (\d+) already present, (\d+) skipped as bad; ([\d.]+) s \(([\d.]+) images/s\)")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_folder(folder: Path, count: int) -> str:
    """`count` JPEGs at varied sizes; returns where the pixels came from ("sample" or "synthetic")."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = [Image.open(path).convert("RGB") for path in sample_paths()]
    source = "sample" if sources else "synthetic"
    if not sources:
        sources = [Image.open(io.BytesIO(data)).convert("RGB") for data in synthetic_photos(len(SYNTHETIC_SIZES))]
    for i in range(count):
        image = sources[i % len(sources)]
        scale = 0.4 + 1.2 * ((i * 7919) % 97) / 96  # spread over 0.4x .. 1.6x, not in file order
        size = (max(16, round(image.width * scale)), max(16, round(image.height * scale)))
        image.resize(size, Image.Resampling.BILINEAR).save(folder / f"img{i:06d}.jpg", quality=90)
    return source


def library_rate(folder: Path, model_name: str) -> dict[str, float]:
    """embed() over every file, 64 at a time, decode included: the library's images/s."""
    from models import create_model
    from service.core.decode import decode_image
    from service.core.embedding import embed
    from service.settings import Settings

    settings = Settings(model=model_name)
    model = create_model(settings.model, settings.model_options())
    batch = settings.batching(model.device.type).max_batch_crops
    files = sorted(folder.glob("*.jpg"))
    started = time.perf_counter()
    for start_index in range(0, len(files), 64):
        images = [decode_image(p.read_bytes(), max_pixels=settings.max_image_pixels, max_side=settings.max_image_side)
                  for p in files[start_index:start_index + 64]]
        embed(model, images, samples=settings.default_samples, policy=settings.default_policy, seed=0,
              max_batch_crops=batch)
    seconds = time.perf_counter() - started
    return {"images": len(files), "seconds": seconds, "images_per_s": len(files) / seconds}


class EmbedRun:
    """`metta embed` as a child process, stderr on a pseudo-terminal (so its progress bar is drawn and read)."""

    def __init__(self, args: list[str], out: Path) -> None:
        self.out = out
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a new pty is 0 columns wide
        self.process = subprocess.Popen([sys.executable, "-c", "from service.cli import main; main()", "embed", *args],
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        self.progress = 0  # the last count the bar showed
        self.loaded: TreeMemory | None = None  # (tree RSS, tree PSS, own RSS) right after the model loaded
        self.peak = [0, 0, 0]
        self._reader = threading.Thread(target=self._read_bar, args=(master,), daemon=True)
        self._reader.start()
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()

    def _read_bar(self, master: int) -> None:
        tail = ""
        while True:
            try:
                chunk = os.read(master, 4096).decode(errors="replace")
            except OSError:  # EIO once the child has exited
                break
            if not chunk:
                break
            tail = (tail + chunk)[-2000:]
            counts = re.findall(r"(\d+)/\d+ \[", tail)
            if counts:
                self.progress = int(counts[-1])
        os.close(master)

    def _sample_rss(self) -> None:
        while self.process.poll() is None:
            memory = tree_memory(self.process.pid)
            if self.loaded is None and self.out.is_dir():  # the dataset opens right after the model loaded
                self.loaded = memory
            self.peak = [max(a, b) for a, b in zip(self.peak, memory, strict=True)]
            time.sleep(0.05)

    def wait(self) -> dict[str, Any]:
        stdout, _ = self.process.communicate()
        self._sampler.join()
        match = _SUMMARY.search(stdout)
        if self.process.returncode != 0 or match is None:
            raise RuntimeError(f"metta embed exited {self.process.returncode}: {stdout}")
        embedded, already, bad, seconds, rate = match.groups()
        loaded = self.loaded or (0, 0, 0)
        memory = {f"{kind}_{what}_mib": value / 2**20
                  for kind, values in (("peak", self.peak), ("after_load", loaded),
                                       ("growth", [p - q for p, q in zip(self.peak, loaded, strict=True)]))
                  for what, value in zip(("tree_rss", "tree_pss", "own_rss"), values, strict=True)}
        return {"embedded": int(embedded), "already": int(already), "bad": int(bad), "seconds": float(seconds),
                "images_per_s": float(rate), **memory}


def kill_and_resume(folder: Path, out: Path, model: str, total: int, parts_before_kill: int) -> dict[str, Any]:
    args = [str(folder), "--out", str(out), "--model", model]
    run = EmbedRun(args, out)
    while len(list(out.glob("part-*.parquet"))) < parts_before_kill and run.process.poll() is None:
        time.sleep(0.05)
    run.process.kill()
    run.process.wait()
    killed_progress = run.progress
    kept = pq.read_table(out).num_rows
    resumed = EmbedRun(args, out).wait()
    paths = pq.read_table(out).column("path").to_pylist()
    return {"killed_at_progress": killed_progress, "rows_kept": kept,
            "redone": killed_progress - kept,  # embedded (per the bar, which lags ~0.1 s) but not in a finished part
            "resumed_embedded": resumed["embedded"], "resumed_already": resumed["already"],
            "final_rows": len(paths), "unique_paths": len(set(paths)), "expected": total}


def server_rates(folder: Path, model: str, log_dir: Path, seconds: float) -> dict[str, Any]:
    server = start_server(log_dir, "--model", model, name="metta", ready_timeout=300)
    try:
        photos = [p.read_bytes() for p in sorted(folder.glob("*.jpg"))[:200]]
        load = asyncio.run(run_load(f"{server.url}/v1/embeddings", json_bodies(photos, 3, "multiscale"), samples=3,
                                    concurrency=16, seconds=seconds))
        out = folder.parent / "remote.parquet"
        remote = EmbedRun([str(folder), "--out", str(out), "--server", server.url], out).wait()
    finally:
        server.stop()
    return {"loadgen_crops_per_s": load.crops_per_s, "loadgen_errors": load.errors,
            "cli_server_images_per_s": remote["images_per_s"], "cli_server_crops_per_s": 3 * remote["images_per_s"],
            "ratio": 3 * remote["images_per_s"] / load.crops_per_s, "cli": remote}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--load-seconds", type=float, default=30.0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["library", "local", "kill", "server"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bulk.json"))
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"images": args.images, "model": args.model, "cpus": os.cpu_count(),
                              "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="metta-bulk-") as temp:
        folder = Path(temp) / "images"
        log(f"writing {args.images} images")
        result["photos"] = make_folder(folder, args.images)
        if "library" not in args.skip:
            log("library embed()")
            result["library"] = library_rate(folder, args.model)
        if "local" not in args.skip:
            log("metta embed (local)")
            out = Path(temp) / "local.parquet"
            result["local"] = EmbedRun([str(folder), "--out", str(out), "--model", args.model], out).wait()
            shutil.rmtree(out)
            if "library" in result:
                result["local"]["ratio_to_library"] = (result["local"]["images_per_s"]
                                                       / result["library"]["images_per_s"])
        if "kill" not in args.skip:
            log("kill -9 and resume")
            parts = max(1, args.images // 1000 * 4 // 10)  # about 40 % in
            result["kill"] = kill_and_resume(folder, Path(temp) / "killed.parquet", args.model, args.images, parts)
        if "server" not in args.skip:
            log("server: load generator, then metta embed --server")
            result["server"] = server_rates(folder, args.model, Path(temp), args.load_seconds)
    result["loadavg_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
