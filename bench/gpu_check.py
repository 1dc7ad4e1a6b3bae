"""The accelerator check behind bench/gpu.sh: R, the service at S ∈ {1, 8, 32}, a device-vs-CPU cosine check.

On a CUDA machine: R (eager and eager channels_last × fp32/bf16/fp16 × batches) and metta-serve for
the default model and resnet50 (random weights), then the default model's mean embeddings on the GPU
against the CPU reference (fp32 must reach cosine ≥ 0.999; bf16 is reported). Without CUDA the same
steps run on the CPU with a smaller grid, and the cosine check compares the CPU's OpenVINO engine
(fp32 and bf16) with eager fp32. Round 2 adds, on CUDA, the service in bf16 with the device's batching
defaults (goal: S=32 at ≥ 0.85 × R bf16), and everywhere the resampling calls per batch (CUDA goal: one
per image and output size) and an EXIF-rotated JPEG against the same pixels stored upright, decoded on
the device (bench/gpu_round2.py). One JSON (and the log that bench/gpu.sh tees) under $OUT.

    PYTHONPATH=. python -m bench.gpu_check --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.gpu_round2 import exif_rotation, render_calls
from bench.raw_limit import measure
from service.testing import REPO, SAMPLE_DIR, Photos, photos, start_process

MODELS = (("efficientnet_lite0", False), ("resnet50", True))  # (name, random weights)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cosine_check(device: str, pictures: Photos, samples: int = 8) -> dict[str, Any]:
    """Mean embeddings (crop_flip, S views, seed 0) on `device` against the CPU fp32 reference.

    On synthetic photos (sample photos absent) every step still runs, and the result says so."""
    from models import ModelOptions, create_model
    from service.core.decode import decode_image
    from service.core.embedding import embed

    images = [decode_image(p, max_pixels=40_000_000, max_side=12_000) for p in pictures.images]
    reference_mode = "eager" if device == "cpu" else "auto"
    reference = embed(create_model("efficientnet_lite0", ModelOptions(device="cpu", mode=reference_mode)),
                      images, samples=samples, policy="crop_flip", seed=0).embeddings
    out: dict[str, Any] = {"images": len(images), "photos": pictures.source, "samples": samples,
                           "reference": f"cpu float32 {reference_mode}", "compared": {}}
    candidates = ([("openvino", "float32"), ("openvino", "bfloat16")] if device == "cpu"
                  else [("auto", "float32"), ("auto", "bfloat16"), ("auto", "float16")])
    for mode, dtype in candidates:
        try:
            model = create_model("efficientnet_lite0", ModelOptions(device=device, mode=mode, dtype=dtype))
            got = embed(model, images, samples=samples, policy="crop_flip", seed=0).embeddings
        except Exception as exc:
            out["compared"][f"{device} {dtype} {mode}"] = {"error": repr(exc)}
            continue
        cos = (got * reference).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
        out["compared"][f"{device} {dtype} {mode}"] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                                                       "pass_0.999": bool(cos.min() >= 0.999)}
        log(f"cosine {device} {dtype} {mode} vs reference: min {cos.min():.6f} mean {cos.mean():.6f}")
    return out


def service_bench(model: str, random_weights: bool, device: str, points: list[tuple[int, int]], seconds: float,
                  log_dir: Path, kind: str = "metta") -> list[dict[str, Any]]:
    from bench.loadgen import json_bodies
    from bench.run import measure_point, server_args

    pictures = photos(64)
    if pictures.source == "synthetic":
        log(f"no sample photos in {SAMPLE_DIR}: the service benchmark uses synthetic JPEGs")
    bodies = {s: json_bodies(pictures.images, s) for s, _ in points}
    # No batching flags: the service's per-device defaults (settings.BATCHING_DEFAULTS) are what is measured.
    cmd, ready = server_args(kind, model, torch.get_num_threads(), random_weights, device)
    server = start_process(cmd, log_dir, name=f"gpu-{model}", ready_path=ready, ready_timeout=300, own_session=True)
    log(f"{model} served on {device} (ready in {server.started_s:.0f} s)")
    rows = []
    try:
        for s, c in points:
            row = measure_point(server, [], bodies, s, c, seconds, 1.0)
            row.update(model=model, photos=pictures.source)
            rows.append(row)
    finally:
        server.stop()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "bench-gpu-out"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    gpu = args.device.startswith("cuda")
    threads = max(1, len(os.sched_getaffinity(0)))
    result: dict[str, Any] = {
        "device": args.device, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "gpu_name": torch.cuda.get_device_name(0) if gpu else None,
        "cpu_threads": threads, "loadavg_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "grid": "gpu" if gpu else "cpu-small",
    }
    started = time.perf_counter()
    log(f"device {args.device} {result['gpu_name'] or ''} torch {torch.__version__} python {platform.python_version()}")

    def step(name: str, fn: Any) -> None:
        try:
            result[name] = fn()
        except Exception as exc:  # one failing step must not lose the others' figures
            log(f"{name} failed: {exc!r}")
            result[name] = {"error": repr(exc), "traceback": traceback.format_exc()}
        (out / "gpu_bench.json").write_text(json.dumps(result, indent=1, default=str))

    for model, random_weights in MODELS:
        if gpu:
            grid = {"engines": ("eager", "eager_cl"), "batches": (1, 8, 32, 128),
                    "dtypes": ("float32", "bfloat16", "float16")}
        elif model == "resnet50":
            grid = {"engines": ("openvino",), "batches": (8,), "dtypes": ("float32",)}
        else:
            grid = {"engines": ("openvino",), "batches": (8, 32), "dtypes": ("float32", "bfloat16")}
        step(f"R_{model}", lambda m=model, rw=random_weights, g=grid: measure(
            m, g["engines"], g["batches"], g["dtypes"], threads if not gpu else 2,
            0.5, args.device, rw, log=log))
    seconds = args.seconds or (4.0 if gpu else 3.0)
    log_dir = out / "logs"
    log_dir.mkdir(exist_ok=True)
    for model, random_weights in MODELS:
        if gpu:
            points = [(s, c) for s in (1, 8, 32) for c in (1, 16)]
        elif model == "resnet50":
            points = [(1, 4), (8, 4)]  # a 2-core CPU runs resnet50 at ~20 crops/s: S=32 would not fit the budget
        else:
            points = [(1, 16), (8, 16), (32, 16)]
        step(f"service_{model}", lambda m=model, rw=random_weights, p=points: service_bench(
            m, rw, args.device, p, seconds, log_dir))
    if gpu:  # round 2's goal: bf16 at S=32 reaches 0.85 x R (bf16), with the device's batching defaults
        step("service_bf16", lambda: service_bench("efficientnet_lite0", False, args.device,
                                                   [(1, 16), (8, 16), (32, 16)], seconds, log_dir, "metta_bf16"))
        rows, r_bf16 = result.get("service_bf16"), result.get("R_efficientnet_lite0", {}).get("R", {}).get("bfloat16")
        if isinstance(rows, list) and r_bf16:
            result["bf16_s32_ratio_to_R"] = next(r["crops_per_s"] for r in rows if r["samples"] == 32) / r_bf16[
                "crops_per_s"]
    step("cosine", lambda: cosine_check(args.device, photos(16)))
    step("render_calls", lambda: render_calls(args.device, photos(4)))
    step("exif_rotation", lambda: exif_rotation(args.device, photos(8)))
    result["elapsed_s"] = time.perf_counter() - started
    result["loadavg_end"] = os.getloadavg()
    (out / "gpu_bench.json").write_text(json.dumps(result, indent=1, default=str))
    summary = []
    for model, _ in MODELS:
        r = result.get(f"R_{model}", {}).get("R", {})
        summary.append(f"R[{model}] " + ", ".join(f"{d} {v['crops_per_s']:.0f} ({v['engine']} b{v['batch']})"
                                                  for d, v in r.items()))
        for row in result.get(f"service_{model}", []) if isinstance(result.get(f"service_{model}"), list) else []:
            summary.append(f"  service {model} S={row['samples']} c={row['concurrency']}: "
                           f"{row['crops_per_s']:.0f} crops/s p50 {row['p50_ms']:.0f} ms p95 {row['p95_ms']:.0f} ms")
    if "bf16_s32_ratio_to_R" in result:
        summary.append(f"service bf16 S=32 / R bf16: {result['bf16_s32_ratio_to_R']:.2f} (goal 0.85)")
    for name in ("render_calls", "exif_rotation"):
        summary.append(f"{name}: {json.dumps(result.get(name))[:300]}")
    cos = result.get("cosine", {}).get("compared", {})
    summary += [f"cosine {k}: min {v.get('min_cosine', math.nan):.6f}" for k, v in cos.items()]
    log("summary\n" + "\n".join(summary) + f"\nelapsed {result['elapsed_s']:.0f} s → {out / 'gpu_bench.json'}")


if __name__ == "__main__":
    main()
