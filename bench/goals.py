"""Round 2's engine goals, side by side in one run (docs/benchmarks.md, "Round 2: the engine").

    python -m bench.goals --out docs/benchmarks/round2            # about 10 minutes on the 2-core box
    python -m bench.goals --parts sleep --repeats 1 --seconds 5   # a quick look

Parts, each with `--repeats` interleaved repeats and the median reported:
- `default`: the default model on the CPU (fp32, the service's engine). R, the best raw forward of the same
  model with the same threads (`bench.raw_limit`, OpenVINO, batches 8/16/32), is measured before and after
  the service windows of every repeat, with the server paused (SIGSTOP); each window's crops/s is divided
  by that repeat's mean R, and by R scaled to the cores the load generator left the server (`scaled_r`).
  Windows: S=32 × 4 clients and S=1 × 16 clients. The service's own stage times (render, forward, reduce,
  the forward's input wait) are read from /metrics for the same window.
- `sleep`: `--model sleep:1000`, a forward that waits 1 ms a crop with the GIL released (a limit of
  1,000 crops/s): S=32, 8 and 1 × 16 clients.
- `ceiling`: `sleep:0` (a forward that costs nothing), this tree against round 1 (main at f1762a5, checked out
  as a worktree and served by `bench/baseline_sleep.py`), S=32 and S=1 × 16 clients, one server paused while
  the other is measured.
- `auto`: the default model, fixed S=32 against `samples: "auto"` (4 … 32) (`bench/auto_s.py`): past 2x overload
  (16 clients) with a deadline of four times a lone S=32 request's latency; and without deadlines, 32 clients
  against a 256-crop queue, then 8 clients pacing at half of fixed S=32's images/s: images/s, status codes, the
  S given, cosine to S=32.
Photos: the sample photos beside the checkout, else synthetic JPEGs of the same sizes (the JSON says which).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import auto_s, prom
from bench.loadgen import json_bodies, run_load
from service.testing import REPO, ServerProcess, photos, start_process, start_server

BASELINE_COMMIT = "f1762a5"
STAGES = {"render": "metta_augment_duration_seconds", "forward": "metta_forward_duration_seconds",
          "reduce": "metta_reduce_duration_seconds", "forward_input_wait": "metta_forward_input_wait_seconds",
          "decode": "metta_decode_duration_seconds", "queue_wait": "metta_queue_wait_seconds"}


def log(message: str) -> None:
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"[{time.strftime('%H:%M:%S')} load {load}] {message}", flush=True)


def window(server: ServerProcess, bodies: dict[int, list[bytes]], samples: int, clients: int,
           seconds: float, paused: list[ServerProcess] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """One closed-loop window; the other servers are paused meanwhile. With /metrics, the stage sums too."""
    for other in paused:
        other.pause()
    before = server.metrics_text()
    cpu_before = server.cpu_seconds()
    started = time.perf_counter()
    try:
        result = asyncio.run(run_load(server.url + "/v1/embeddings", bodies[samples], samples, clients, seconds,
                                      warmup_s=2.0, max_requests=50_000))
    finally:
        for other in paused:
            other.resume()
    row: dict[str, Any] = {"samples": samples, "clients": clients, "crops_per_s": result.crops_per_s,
                           "images_per_s": result.images_per_s, "p50_ms": result.p50_ms, "p95_ms": result.p95_ms,
                           "errors": result.errors, "requests": result.requests, "client_cpu": result.client_cpu,
                           "server_cores": (server.cpu_seconds() - cpu_before) / (time.perf_counter() - started)}
    after = server.metrics_text()
    if after:
        row["stage_seconds"] = {name: prom.delta(prom.histogram(after, metric), prom.histogram(before, metric))
                                .get("sum", 0.0) for name, metric in STAGES.items()}
        batch = prom.delta(prom.histogram(after, "metta_batch_crops"), prom.histogram(before, "metta_batch_crops"))
        row["mean_batch_crops"] = prom.mean(batch)
    log(f"{server.name:12s} S={samples:2d} x {clients:2d}: {result.crops_per_s:7.1f} crops/s "
        f"{result.images_per_s:6.1f} img/s p50 {result.p50_ms:6.0f} ms errors {result.errors}")
    return row


def raw_limit(model: str, threads: int, seconds: float, out: Path) -> float:
    """R: crops/s of the best raw forward (OpenVINO, batches 8/16/32), in a process of its own."""
    path = out / f"raw-{time.monotonic_ns()}.json"
    subprocess.run([sys.executable, "-m", "bench.raw_limit", "--model", model, "--threads", str(threads),
                    "--engines", "openvino", "--batches", "8,16,32", "--dtypes", "float32", "--stages", "0",
                    "--seconds", str(seconds), "--out", str(path)], cwd=REPO, check=True, capture_output=True)
    r = float(json.loads(path.read_text())["R"]["float32"]["crops_per_s"])
    path.unlink()
    log(f"R = {r:.1f} crops/s")
    return r


def part_default(args: argparse.Namespace, bodies: dict[int, list[bytes]], logs: Path) -> dict[str, Any]:
    server = start_server(logs, "--threads", str(args.threads), name="metta", own_session=True,
                          ready_timeout=600)
    repeats: list[dict[str, Any]] = []
    try:
        for repeat in range(args.repeats):
            server.pause()
            r_before = raw_limit("efficientnet_lite0", args.threads, args.raw_seconds, logs)
            server.resume()
            rows = [window(server, bodies, s, c, args.seconds) for s, c in ((32, 4), (1, 16))]
            server.pause()
            r_after = raw_limit("efficientnet_lite0", args.threads, args.raw_seconds, logs)
            server.resume()
            r = (r_before + r_after) / 2
            for row in rows:
                row["ratio_to_R"] = row["crops_per_s"] / r
                row["ratio_to_scaled_R"] = row["crops_per_s"] / scaled_r(r, row["client_cpu"])
            repeats.append({"repeat": repeat, "R_before": r_before, "R_after": r_after, "windows": rows})
    finally:
        server.stop()
    def medians(ratio: str) -> dict[str, float]:
        return {f"S={s} x {c}": statistics.median(w[ratio] for rep in repeats for w in rep["windows"]
                                                  if (w["samples"], w["clients"]) == (s, c))
                for s, c in ((32, 4), (1, 16))}

    return {"repeats": repeats, "median_ratio": medians("ratio_to_R"),
            "median_ratio_to_scaled_R": medians("ratio_to_scaled_R")}


def scaled_r(r: float, client_cpu: float) -> float:
    """R scaled to the cores the load generator leaves the server: R was measured with the whole machine, the
    window shared it with the generator (its CPU seconds per second of the window, subtracted from nproc)."""
    cores = os.cpu_count() or 1
    return r * max(0.0, cores - client_cpu) / cores


def part_sleep(args: argparse.Namespace, bodies: dict[int, list[bytes]], logs: Path) -> dict[str, Any]:
    limit = 1000.0
    server = start_server(logs, "--model", "sleep:1000", name="sleep1000", own_session=True)
    points = ((32, 16), (8, 16), (1, 16))
    try:
        rows = [window(server, bodies, s, c, args.seconds) for _ in range(args.repeats) for s, c in points]
    finally:
        server.stop()
    for row in rows:
        row["ratio_to_limit"] = row["crops_per_s"] / limit
    return {"limit_crops_per_s": limit, "windows": rows, "median_ratio": {
        f"S={s} x {c}": statistics.median(w["ratio_to_limit"] for w in rows if (w["samples"], w["clients"]) == (s, c))
        for s, c in points}}


def part_ceiling(args: argparse.Namespace, bodies: dict[int, list[bytes]], logs: Path) -> dict[str, Any]:
    worktree = Path(tempfile.gettempdir()) / f"metta-{BASELINE_COMMIT}"
    if not worktree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), BASELINE_COMMIT], cwd=REPO, check=True)
    servers = {
        "after": start_server(logs, "--model", "sleep:0", "--threads", str(args.threads), name="after",
                              own_session=True),
        "before": start_process([str(REPO / "bench" / "baseline_sleep.py"), "--model", "sleep:0", "--mode", "eager",
                                 "--threads", str(args.threads)], logs, name="before", own_session=True,
                                env={"PYTHONPATH": str(worktree)}),
    }
    points = ((32, 16), (1, 16))
    rows: list[dict[str, Any]] = []
    try:
        for _ in range(args.repeats):
            for s, c in points:
                for name, server in servers.items():
                    others = [o for n, o in servers.items() if n != name]
                    rows.append({"code": name, **window(server, bodies, s, c, args.seconds, others)})
    finally:
        for server in servers.values():
            server.stop()
    return {"baseline": BASELINE_COMMIT, "windows": rows, "median_crops_per_s": {
        f"{code} S={s} x {c}": statistics.median(w["crops_per_s"] for w in rows
                                                  if (w["code"], w["samples"], w["clients"]) == (code, s, c))
        for code in servers for s, c in points}}


def part_auto(args: argparse.Namespace, bodies: dict[int, list[bytes]], logs: Path) -> dict[str, Any]:
    """Auto S against fixed S=32, with deadlines and without (bench/auto_s.py)."""
    images = [json.loads(body)["images"][0] for body in bodies[1][:40]]
    result = {"with_deadlines": auto_s.with_deadlines(images, args.threads, args.seconds * 2, logs)}
    log(f"auto with deadlines: {json.dumps(result['with_deadlines'])[:600]}")
    result["without_deadlines"] = auto_s.without_deadlines(images, args.threads, args.seconds * 2, logs)
    log(f"auto without deadlines: {json.dumps(result['without_deadlines'])[:900]}")
    result["images_per_s_ratio"] = {name: run["images_per_s_ratio"] for name, run in result.items()}
    return result


PARTS = {"default": part_default, "sleep": part_sleep, "ceiling": part_ceiling, "auto": part_auto}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="each load window")
    parser.add_argument("--raw-seconds", type=float, default=1.5, help="timing per raw-forward point")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-goals"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    pictures = photos(limit=100)
    log(f"photos: {len(pictures)} ({pictures.source})")
    bodies = {s: json_bodies(pictures.images, s) for s in (1, 8, 32)}
    results: dict[str, Any] = {"photos": pictures.source, "threads": args.threads, "repeats": args.repeats,
                               "seconds": args.seconds, "command": " ".join(["python -m bench.goals", *sys.argv[1:]]),
                               "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]}
    for part in args.parts.split(","):
        log(f"part {part}")
        results[part] = PARTS[part](args, bodies, logs)
        (args.out / "goals.json").write_text(json.dumps(results, indent=1))
    results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    (args.out / "goals.json").write_text(json.dumps(results, indent=1))
    for part in args.parts.split(","):
        summary = (results[part].get("median_ratio") or results[part].get("median_crops_per_s")
                   or results[part].get("images_per_s_ratio"))
        log(f"{part}: {json.dumps(summary)}")
        if "median_ratio_to_scaled_R" in results[part]:
            log(f"{part} against R scaled to the load generator's share: "
                f"{json.dumps(results[part]['median_ratio_to_scaled_R'])}")


if __name__ == "__main__":
    main()
