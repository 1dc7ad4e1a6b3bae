"""`metta embed --ray` and `metta embed s3://...` against the local run from disk (docs/benchmarks.md).

    python -m bench.ray_bulk --part ray --out /tmp/ray.json   # local vs a 2-node loopback Ray cluster
    python -m bench.ray_bulk --part s3 --out /tmp/s3.json     # from disk vs from a loopback S3 server

1. A folder of N images (bench.bulk.make_folder: the sample photos re-encoded at varied sizes, or synthetic).
2. `--part ray`: a Ray cluster on loopback (`ray start --head`, dashboard off, and a second node; 1 logical CPU
   each), then alternately the local `metta embed FOLDER` and `metta embed FOLDER --ray ADDRESS --actors 2
   --actor-threads 1`, `--repeats` times; images/s from each run's summary line and the command's wall time.
   The summary's window runs from when the model is loaded to the last row written: the local run's opens once
   its model has loaded, the Ray run's once its first actor has (process start, imports and model load are
   outside both; the Ray run prints how long its first actor took, kept as `actors_ready_s`). Wall time is the
   whole command, every start-up included. Rows: paths, hashes and metadata equal, the embeddings' least cosine.
3. `--part s3`: the same folder uploaded to moto's S3 server on loopback; alternately `metta embed FOLDER`
   and `metta embed s3://bucket/prefix`, the same figures.
Default model, policy and S (efficientnet_lite0, multiscale, 3). The temporary folder is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from bench.bulk import _SUMMARY, log, make_folder
from service.testing import REPO
from tests.e2e.object_storage import s3_environment, start_s3_server, upload
from tests.e2e.ray_cluster import RayCluster, cluster_environment

_ACTORS_READY = re.compile(r"actors was ready ([\d.]+) s after")


def embed(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", "from service.cli import main; main()", "embed", *args], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, **env}, timeout=1200)
    wall = time.perf_counter() - started
    match = _SUMMARY.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"metta embed {' '.join(args)} → {result.returncode}\n{result.stdout}\n"
                           f"{result.stderr[-4000:]}")
    run = {"embedded": int(match.group(1)), "seconds": float(match.group(4)), "images_per_s": float(match.group(5)),
           "wall_s": round(wall, 2)}
    if ready := _ACTORS_READY.search(result.stderr):
        run["actors_ready_s"] = float(ready.group(1))
    return run


def compare(a: Path, b: Path, *, same_paths: bool) -> dict[str, Any]:
    """Rows of two datasets: equal paths (or file names), hashes and metadata; the least cosine of the embeddings."""
    x, y = pq.read_table(a), pq.read_table(b)
    meta = [{k: v for k, v in t.schema.metadata.items() if k != b"metta.created"} for t in (x, y)]

    def keyed(table: Any) -> dict[str, tuple[str, np.ndarray]]:
        return {(p if same_paths else p.rsplit("/", 1)[1]): (s, np.asarray(e, np.float64)) for p, s, e in
                zip(*(table.column(c).to_pylist() for c in ("path", "sha256", "embedding")), strict=True)}

    rx, ry = keyed(x), keyed(y)
    cosines = [float(rx[k][1] @ ry[k][1] / (np.linalg.norm(rx[k][1]) * np.linalg.norm(ry[k][1])))
               for k in rx if k in ry]
    return {"rows": [x.num_rows, y.num_rows], "same_keys": rx.keys() == ry.keys(),
            "same_hashes": all(rx[k][0] == ry[k][0] for k in rx if k in ry), "same_metadata": meta[0] == meta[1],
            "min_cosine": min(cosines) if cosines else None}


def ratio(runs: dict[str, list[dict[str, Any]]], a: str, b: str, key: str) -> float:
    return statistics.median(r[key] for r in runs[a]) / statistics.median(r[key] for r in runs[b])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("ray", "s3"), required=True)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ray-bulk-"))
    s3 = cluster = None
    try:
        folder = work / "photos"
        source = make_folder(folder, args.images)
        log(f"{args.images} images ({source}) in {folder}")
        report: dict[str, Any] = {"part": args.part, "images": args.images, "photos": source,
                                  "repeats": args.repeats, "load_average_before": os.getloadavg()}
        if args.part == "ray":
            cluster = RayCluster(work, cluster_environment())
            cluster.start_head(cpus=1)
            cluster.add_node(cpus=1)
            variants = {"local": ([str(folder)], {}),
                        "ray": ([str(folder), "--ray", cluster.address, "--actors", "2", "--actor-threads", "1"],
                                cluster.client_env)}
        else:
            s3 = start_s3_server(work)
            env = s3_environment(s3)
            upload(s3, "bench", {f"photos/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())})
            variants = {"disk": ([str(folder)], {}), "s3": (["s3://bench/photos"], env)}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name, (inputs, env) in variants.items():
                out = work / f"{name}-{repeat}.parquet"
                runs[name].append(embed([*inputs, "--out", str(out)], env))
                log(f"{name} #{repeat}: {runs[name][-1]}")
        report["runs"] = runs
        a, b = variants
        report[f"{b}_over_{a}_images_per_s"] = round(ratio(runs, b, a, "images_per_s"), 3)
        report[f"{b}_over_{a}_wall"] = round(ratio(runs, a, b, "wall_s"), 3)  # > 1: b is faster end to end
        report["rows"] = compare(work / f"{a}-0.parquet", work / f"{b}-0.parquet", same_paths=args.part == "ray")
        report["load_average_after"] = os.getloadavg()
    finally:
        if cluster is not None:
            cluster.stop()
        if s3 is not None:
            s3.terminate()
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
