"""The whole benchmark, side by side in one run: R, metta-serve, the peers, the batching sweep, a soak.

    python -m bench.run                 # the full run (< 40 min on the 2-core CPU box)
    python -m bench.run --quick         # a smaller grid, one repeat (< 5 min)
    python -m bench.run --parts raw,grid --out /tmp/bench

Writes results.json, tables.md and the PNG plots into --out (default docs/benchmarks). Loopback only;
every server is started here on a free port in its own session and stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import prom
from bench.loadgen import json_bodies, run_load
from service.testing import REPO, SAMPLE_DIR, ServerProcess, photos, start_process

SERVICE_S = (1, 2, 4, 8, 16, 32)
SERVICE_C = (1, 4, 16)
PEER_S = (1, 8, 32)
PEER_C = (1, 16)
BF16_POINTS = ((1, 16), (8, 16), (32, 16))
# (max_batch_crops, chunk_crops, max_wait_ms): one factor at a time around the chosen defaults.
SWEEP = ((16, 8, 0.0), (8, 8, 0.0), (32, 16, 0.0), (32, 32, 0.0), (64, 32, 0.0), (32, 16, 5.0))
SWEEP_POINTS = ((1, 16), (8, 16), (32, 16), (32, 1))


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg()[0]:.1f}] {message}", flush=True)


def server_args(kind: str, model: str, threads: int, random_weights: bool, device: str,
                knobs: tuple[int, int, float] | None = None) -> tuple[list[str], str]:
    rw = ["--random-weights"] if random_weights else []
    if kind.startswith("metta"):
        args = ["-m", "service", "--model", model, "--threads", str(threads), "--device", device,
                *rw]
        if kind == "metta_bf16":
            args += ["--dtype", "bfloat16"]
        if knobs:
            args += ["--max-batch-crops", str(knobs[0]), "--chunk-crops", str(knobs[1]), "--max-wait-ms", str(knobs[2])]
        return args, "/readyz"
    if kind == "naive":
        return ["-m", "bench.peers.naive", "--model", model, "--threads", str(threads), *rw], "/health"
    variant = kind.removeprefix("litserve_")
    return ["-m", "bench.peers.litserve_peer", "--variant", variant, "--model", model, "--threads", str(threads),
            *rw], "/health"


def measure_point(server: ServerProcess, others: list[ServerProcess], bodies: dict[int, list[bytes]], samples: int,
                  concurrency: int, seconds: float, warmup: float) -> dict[str, Any]:
    """One closed-loop window against `server`; for metta-serve also the /metrics deltas of that window."""
    is_metta = server.name.startswith("metta")
    before = server.metrics_text() if is_metta else ""
    cpu_before = {s.name: s.cpu_seconds() for s in [server, *others]}
    wall = time.perf_counter()
    load = loadavg()[0]
    for other in others:  # the other servers under test are frozen (SIGSTOP) while this one is measured
        other.pause()
    try:
        result = asyncio.run(run_load(server.url + "/v1/embeddings", bodies[samples], samples, concurrency,
                                      seconds, warmup, max_requests=20_000))
    finally:
        for other in others:
            other.resume()
    wall = time.perf_counter() - wall
    row: dict[str, Any] = {"target": server.name, **asdict(result), "loadavg_1m": load}
    row["server_cpu"] = (server.cpu_seconds() - cpu_before[server.name]) / wall
    row["idle_servers_cpu"] = sum(s.cpu_seconds() - cpu_before[s.name] for s in others) / wall
    if is_metta:
        after = server.metrics_text()
        label = str(next(b for b in (1, 2, 4, 8, 16, 32, 64) if samples <= b)) if samples <= 64 else "128+"
        hist = prom.delta(prom.histogram(after, "metta_request_duration_seconds",
                                         lambda lab: lab.get("samples") == label),
                          prom.histogram(before, "metta_request_duration_seconds",
                                         lambda lab: lab.get("samples") == label))
        stages = {}
        for stage in ("decode", "queue_wait", "augment", "forward", "reduce"):
            name = f"metta_{stage}_duration_seconds" if stage != "queue_wait" else "metta_queue_wait_seconds"
            d = prom.delta(prom.histogram(after, name), prom.histogram(before, name))
            stages[stage] = {"sum_s": d.get("sum", 0.0), "count": d.get("count", 0.0)}
        crops = prom.delta(prom.histogram(after, "metta_batch_crops"), prom.histogram(before, "metta_batch_crops"))
        row["prom"] = {
            "count": hist.get("count", 0.0), "mean_ms": 1000 * prom.mean(hist),
            "p50_ms": 1000 * prom.quantile(hist, 0.5)[0],
            "p50_bucket_ms": [1000 * x for x in prom.quantile(hist, 0.5)[1:]],
            "p95_ms": 1000 * prom.quantile(hist, 0.95)[0],
            "p95_bucket_ms": [1000 * x for x in prom.quantile(hist, 0.95)[1:]],
            "stages": stages, "mean_batch_crops": prom.mean(crops),
        }
    log(f"{server.name:15s} S={samples:2d} c={concurrency:2d}: {result.crops_per_s:6.1f} crops/s "
        f"{result.images_per_s:6.1f} img/s p50 {result.p50_ms:7.1f} p95 {result.p95_ms:7.1f} ms "
        f"err {result.errors} server {row['server_cpu']:.2f} cores, client {result.client_cpu:.2f}")
    return row


def run_raw(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    quick = args.quick
    cmd = [sys.executable, "-m", "bench.raw_limit", "--model", args.model, "--threads", str(args.threads),
           "--device", args.device, "--out", str(out / "raw.json"),
           "--seconds", "0.8" if quick else "1.5", "--stages", "32"]
    if quick:
        cmd += ["--engines", "eager_cl,openvino", "--batches", "8,32"]
    if args.random_weights:
        cmd.append("--random-weights")
    log("raw limit: " + " ".join(cmd[1:]))
    subprocess.run(cmd, cwd=REPO, check=True, timeout=1200)
    result: dict[str, Any] = json.loads((out / "raw.json").read_text())
    return result


def start_servers(kinds: list[str], args: argparse.Namespace, log_dir: Path) -> dict[str, ServerProcess]:
    servers: dict[str, ServerProcess] = {}
    try:
        for kind in kinds:  # one at a time: each model build gets the whole machine
            cmd, ready = server_args(kind, args.model, args.threads, args.random_weights, args.device)
            servers[kind] = start_process(cmd, log_dir, name=kind, ready_path=ready, ready_timeout=600,
                                          own_session=True)
            log(f"{kind} ready in {servers[kind].started_s:.0f} s (pid {servers[kind].pid})")
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def run_grid(args: argparse.Namespace, servers: dict[str, ServerProcess],
             bodies: dict[int, list[bytes]]) -> list[dict[str, Any]]:
    quick = args.quick
    service_points = ([(s, c) for s in (1, 8, 32) for c in (1, 16)] if quick
                      else [(s, c) for s in SERVICE_S for c in SERVICE_C])
    peer_points = [(1, 16), (32, 1), (32, 16)] if quick else [(s, c) for s in PEER_S for c in PEER_C]
    bf16_points = [(32, 16)] if quick else list(BF16_POINTS)
    plan: list[tuple[str, int, int]] = []
    for s, c in sorted(set(service_points) | set(peer_points) | set(bf16_points)):
        if (s, c) in service_points and "metta" in servers:
            plan.append(("metta", s, c))
        if (s, c) in bf16_points and "metta_bf16" in servers:
            plan.append(("metta_bf16", s, c))
        if (s, c) in peer_points:
            plan += [(kind, s, c) for kind in ("naive", "litserve_eager", "litserve_ours") if kind in servers]
    compared = set(peer_points) | set(bf16_points)
    rows = []
    for rep in range(args.reps):
        todo = [p for p in plan if rep == 0 or (p[1], p[2]) in compared]  # comparison points are repeated
        log(f"grid repeat {rep + 1}/{args.reps}: {len(todo)} points")
        for kind, s, c in todo:
            others = [v for k, v in servers.items() if k != kind]
            row = measure_point(servers[kind], others, bodies, s, c, args.seconds, args.warmup)
            row["repeat"] = rep
            rows.append(row)
    return rows


def run_sweep(args: argparse.Namespace, bodies: dict[int, list[bytes]], log_dir: Path) -> list[dict[str, Any]]:
    rows = []
    configs = SWEEP[:2] if args.quick else SWEEP
    for knobs in configs:
        cmd, ready = server_args("metta", args.model, args.threads, args.random_weights, args.device, knobs)
        server = start_process(cmd, log_dir, name=f"metta_sweep_{knobs[0]}_{knobs[1]}_{knobs[2]:g}", ready_path=ready,
                               ready_timeout=600, own_session=True)
        try:
            for s, c in SWEEP_POINTS:
                row = measure_point(server, [], bodies, s, c, args.sweep_seconds, args.warmup)
                row.update(max_batch_crops=knobs[0], chunk_crops=knobs[1], max_wait_ms=knobs[2])
                rows.append(row)
        finally:
            server.stop()
    return rows


def py_spy_summary(raw_path: Path) -> dict[str, Any]:
    """Collapsed py-spy stacks → share of samples per pipeline stage (first matching frame, innermost first)."""
    stages = (("forward (engine)", ("models/execution.py",)),
              ("normalise uint8→float", ("normalize (",)),
              ("forward (engine)", ("embed_views (", "forward (")),
              ("render views", ("render_view (", "render_batch (")),
              ("plan + downscale", ("shrink_for_views (", "service/core/policies.py")),
              ("decode JPEG", ("service/core/decode.py",)),
              ("reduce", ("service/core/reduce.py",)),
              ("reply JSON", ("_reply (", "_encode (")),
              ("request parse", ("service/api/requests.py", "b64decode (")))
    counts: dict[str, float] = {}
    total = 0.0
    for line in raw_path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        frames = stack.split(";")[::-1]
        label = "HTTP server, event loop, other"
        for frame in frames:
            hit = next((name for name, keys in stages if any(k in frame for k in keys)), None)
            if hit:
                label = hit
                break
        counts[label] = counts.get(label, 0.0) + int(n)
    return {"samples": total, "share": {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}}


def run_soak(args: argparse.Namespace, bodies: dict[int, list[bytes]], log_dir: Path, out: Path) -> dict[str, Any]:
    """metta-serve at S=32, 16 clients, for soak_s: RSS every 5 s; py-spy for 20 s in the middle."""
    cmd, ready = server_args("metta", args.model, args.threads, args.random_weights, args.device)
    server = start_process(cmd, log_dir, name="metta_soak", ready_path=ready, ready_timeout=600, own_session=True)
    rss: list[tuple[float, int]] = []
    stop = threading.Event()
    spy: dict[str, Any] = {}

    def sample() -> None:
        started = time.perf_counter()
        while not stop.is_set():
            rss.append((time.perf_counter() - started, server.rss_bytes()))
            stop.wait(5.0)

    def profile() -> None:
        time.sleep(min(30.0, args.soak_s / 3))
        raw = out / "profile-S32-c16.txt"
        py_spy = Path(sys.executable).parent / "py-spy"
        try:
            subprocess.run([str(py_spy), "record", "--pid", str(server.pid), "--duration", "20", "--rate", "50",
                            "--format", "raw", "--nonblocking", "--output", str(raw)],
                           check=True, timeout=120, capture_output=True)
            spy.update(py_spy_summary(raw))
        except (OSError, subprocess.SubprocessError) as exc:
            spy["error"] = repr(exc)

    sampler, profiler = threading.Thread(target=sample), threading.Thread(target=profile)
    sampler.start()
    profiler.start()
    try:
        row = measure_point(server, [], bodies, 32, 16, args.soak_s, args.warmup)
    finally:
        stop.set()
        sampler.join()
        profiler.join()
        server.stop()
    return {"load": row, "rss": rss, "profile": spy}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller grid, one repeat (< 5 min)")
    parser.add_argument("--parts", default="raw,grid,sweep,soak", help="comma-separated subset")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--targets", default="metta,metta_bf16,naive,litserve_eager,litserve_ours")
    parser.add_argument("--seconds", type=float, default=None, help="measured window per point")
    parser.add_argument("--sweep-seconds", type=float, default=None)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--soak-s", type=float, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="a results.json whose parts not run now are carried over (raw, grid, sweep, soak)")
    args = parser.parse_args(argv)
    # SIGTERM (`timeout`, a CI cancel) unwinds like Ctrl-C, so the `finally` blocks stop every server started here
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args.seconds = args.seconds or (3.0 if args.quick else 6.0)
    args.sweep_seconds = args.sweep_seconds or (3.0 if args.quick else 5.0)
    args.reps = args.reps or (1 if args.quick else 3)
    args.soak_s = args.soak_s or (20.0 if args.quick else 300.0)
    parts = set(args.parts.split(","))
    pictures = photos()
    if pictures.source == "synthetic":
        log(f"no sample photos in {SAMPLE_DIR}: the load tests use {len(pictures)} synthetic JPEGs of their sizes")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out / "logs"
    log_dir.mkdir(exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "argv": sys.argv, "quick": args.quick, "model": args.model, "threads": args.threads, "device": args.device,
        "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "python": platform.python_version(),
        "loadavg_start": loadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "photos": pictures.source,
    }
    bodies = {s: json_bodies(pictures.images, s) for s in sorted(set(SERVICE_S) | {1, 8, 32})}
    if "raw" in parts:
        results["raw"] = run_raw(args, out)
    if "grid" in parts:
        kinds = [k for k in args.targets.split(",") if k]
        servers = start_servers(kinds, args, log_dir)
        results["startup_s"] = {k: s.started_s for k, s in servers.items()}
        try:
            results["grid"] = run_grid(args, servers, bodies)
        finally:
            for server in servers.values():
                server.stop()
    if "sweep" in parts:
        results["sweep"] = run_sweep(args, bodies, log_dir)
    if "soak" in parts:
        results["soak"] = run_soak(args, bodies, log_dir, out)
    if args.reuse:
        previous = json.loads(args.reuse.read_text())
        for part in ("raw", "grid", "sweep", "soak"):
            if part not in results and part in previous:
                results[part] = previous[part]
        results["reused"] = {"from": str(args.reuse), "argv": previous.get("argv"),
                             "started": previous.get("started"), "loadavg_start": previous.get("loadavg_start"),
                             "loadavg_end": previous.get("loadavg_end"), "elapsed_s": previous.get("elapsed_s")}
    results["loadavg_end"] = loadavg()
    results["elapsed_s"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log(f"done in {results['elapsed_s'] / 60:.1f} min → {out / 'results.json'}")
    from bench.report import write_report

    write_report(results, out)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
