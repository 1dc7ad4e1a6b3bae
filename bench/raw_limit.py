"""R, the raw limit: crops/s of the backbone's forward alone on random input, per engine × batch × dtype.

The engines are the service's own (`models.create_model` with `ModelOptions(mode=..., dtype=...,
threads=...)`), plus plain eager (contiguous memory format), which the service never uses but a
first attempt would. Timed: the engine's forward on an already-normalised float batch (what
`LoadedModel.embed_views` calls after normalising uint8 views), median over iterations.

    python -m bench.raw_limit --model efficientnet_lite0 --threads 2 --out raw.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from models import ModelOptions, build_backbone, create_model
from service.testing import photos

ENGINES = ("eager", "eager_cl", "torchscript", "openvino")
BATCHES = (1, 2, 4, 8, 16, 32)
DTYPES = ("float32", "bfloat16")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _plain_eager(name: str, options: ModelOptions) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """The backbone as a first attempt runs it: eager, default (contiguous) memory format."""
    built = build_backbone(name, options)
    dtype = _TORCH_DTYPES[options.dtype]
    backbone = built.backbone.eval().to(options.device, dtype=dtype)
    if options.threads:
        torch.set_num_threads(options.threads)
    return (lambda x: backbone(x.to(dtype))), built.spec.preprocess.input_size


def load_runner(name: str, engine: str, dtype: str, threads: int, device: str = "cpu",
                random_weights: bool = False) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """(forward on a normalised float batch, input size) for one engine."""
    options = ModelOptions(device=device, dtype=dtype, threads=threads, random_weights=random_weights,
                           mode={"eager_cl": "eager"}.get(engine, engine))
    if engine == "eager":
        return _plain_eager(name, options)
    loaded = create_model(name, options)
    return loaded.forward, loaded.spec.preprocess.input_size


def time_forward(run: Callable[[torch.Tensor], torch.Tensor], batch: int, size: int, seconds: float,
                 device: str = "cpu") -> dict[str, float]:
    """Median seconds per forward of a random batch, timed for about `seconds` (at least 3 calls)."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        for _ in range(2):
            run(x)
        sync()
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
            started = time.perf_counter()
            run(x)
            sync()
            times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {"batch": batch, "seconds_per_forward": median, "crops_per_s": batch / median, "calls": len(times)}


def measure(name: str, engines: tuple[str, ...], batches: tuple[int, ...], dtypes: tuple[str, ...],
            threads: int, seconds: float, device: str = "cpu", random_weights: bool = False,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for dtype in dtypes:
        for engine in engines:
            started = time.perf_counter()
            try:
                run, size = load_runner(name, engine, dtype, threads, device, random_weights)
            except Exception as exc:  # an engine/dtype this machine cannot run is reported, not fatal
                log(f"  {engine:12s} {dtype:9s} unavailable: {exc!r}")
                rows.append({"engine": engine, "dtype": dtype, "error": repr(exc)})
                continue
            load_s = time.perf_counter() - started
            for batch in batches:
                row: dict[str, Any] = {"engine": engine, "dtype": dtype, "load_s": load_s,
                       **time_forward(run, batch, size, seconds, device)}
                rows.append(row)
                log(f"  {engine:12s} {dtype:9s} batch {batch:3d}: {row['crops_per_s']:7.1f} crops/s "
                    f"({1000 * row['seconds_per_forward']:.1f} ms/forward)")
            del run
    best: dict[str, Any] = {}
    for dtype in dtypes:
        ok = [r for r in rows if r["dtype"] == dtype and "crops_per_s" in r]
        if ok:
            top = max(ok, key=lambda r: r["crops_per_s"])
            best[dtype] = {"crops_per_s": top["crops_per_s"], "engine": top["engine"], "batch": top["batch"]}
    forward32 = {dtype: min((r["seconds_per_forward"] for r in rows if r["dtype"] == dtype
                             and r.get("batch") == 32 and "crops_per_s" in r), default=None) for dtype in dtypes}
    return {"model": name, "threads": threads, "device": device, "rows": rows, "R": best,
            "forward32_s": forward32, "torch": torch.__version__, "python": platform.python_version()}


def view_costs(name: str, images: list[bytes], samples: int, threads: int, random_weights: bool = False,
               device: str = "cpu") -> dict[str, float]:
    """Per image, the service's own pre-forward work at S views: decode, plan + downscale, render + stack."""
    import types

    from service.core.decode import decode_image
    from service.core.embedding import EmbedOptions, ImageJob
    from service.core.policies import CropFlipPolicy
    from service.core.render import render_view

    torch.set_num_threads(threads)
    spec = build_backbone(name, ModelOptions(random_weights=random_weights)).spec
    shim = types.SimpleNamespace(spec=spec, device=torch.device(device), dim=spec.dim)
    decode_s, plan_s, render_s = [], [], []
    for seed, data in enumerate(images):
        t0 = time.perf_counter()
        image = decode_image(data, max_pixels=40_000_000, max_side=12_000)
        t1 = time.perf_counter()
        job = ImageJob(image, EmbedOptions(samples, CropFlipPolicy(), seed), shim)  # type: ignore[arg-type]
        t2 = time.perf_counter()
        torch.stack([render_view(job.source, view, spec.preprocess) for view in job.render_views])
        t3 = time.perf_counter()
        decode_s.append(t1 - t0)
        plan_s.append(t2 - t1)
        render_s.append(t3 - t2)
    return {"samples": samples, "images": len(images), "decode_s": statistics.median(decode_s),
            "plan_shrink_s": statistics.median(plan_s), "render_s": statistics.median(render_s)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.5, help="timing per point")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--stages", type=int, default=32, help="also time decode + views at this S (0: no)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = measure(args.model, tuple(args.engines.split(",")), tuple(int(b) for b in args.batches.split(",")),
                     tuple(args.dtypes.split(",")), args.threads, args.seconds, args.device, args.random_weights)
    if args.stages:
        pictures = photos(30)
        costs = view_costs(args.model, pictures.images, args.stages, args.threads, args.random_weights, args.device)
        result["stages"] = {**costs, "photos": pictures.source}
        pre = costs["decode_s"] + costs["plan_shrink_s"] + costs["render_s"]
        print(f"S={args.stages}: decode {1000 * costs['decode_s']:.1f} ms + plan/downscale "
              f"{1000 * costs['plan_shrink_s']:.1f} ms + render {1000 * costs['render_s']:.1f} ms = "
              f"{1000 * pre:.1f} ms per image ({pictures.source} photos)")
    for dtype, best in result["R"].items():
        print(f"R[{dtype}] = {best['crops_per_s']:.1f} crops/s ({best['engine']}, batch {best['batch']})")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
