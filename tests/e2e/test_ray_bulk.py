"""`metta embed ... --ray ADDRESS` on a real Ray cluster on loopback: a head and a second node process.

The same rows as the local run; a node whose raylet is SIGKILLed mid-run, and the job still ends with every
photo exactly once; a driver killed mid-run, and the rerun resumes. The photos are 1,000: the sample photos
padded with synthetic ones (all synthetic without them) for the equality, small generated JPEGs with a
sleeping test backbone (no CPU, a known pace) for the kills, so the kill lands mid-run on a busy machine.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from service.testing import REPO, photos, synthetic_photos
from tests.e2e.object_storage import s3_environment, start_s3_server, upload
from tests.e2e.ray_cluster import RayCluster, cluster_environment
from tests.e2e.test_bulk_e2e import write_photos

PHOTOS = 1_000
SLEEPING = ["--model", "sleep:30000", "--mode", "eager", "--policy", "center"]  # 30 ms per photo per actor


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3) -> Iterator[RayCluster]:
    cluster = RayCluster(tmp_path_factory.mktemp("ray"), {**cluster_environment(), **s3_environment(s3)})
    try:
        cluster.start_head(cpus=2)
        cluster.add_node(cpus=1)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("small") / "photos"
    write_photos(folder, PHOTOS)
    return folder


def embed(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`metta embed ARGS` as a user runs it; with --ray, ENV carries the cluster's token."""
    return subprocess.Popen([sys.executable, "-c", "from service.cli import main; main()", "embed", *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def finish(process: subprocess.Popen[str], timeout: float = 420) -> str:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"exit {process.returncode}\n{stdout}\n{stderr[-5000:]}"
    return stdout


def assert_each_photo_once(out: Path, folder: Path) -> None:
    paths = pq.read_table(out).column("path").to_pylist()
    counts = collections.Counter(paths)
    assert [p for p, n in counts.items() if n > 1] == [], "a photo written twice"
    assert sorted(paths) == sorted(str(p) for p in folder.iterdir()), "a photo missing"
    assert not list(out.glob(".*")), "a temporary part left behind"


def wait_for_parts(out: Path, count: int, process: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(list(out.glob("part-*.parquet"))) < count:
        assert process.poll() is None, f"the run ended before {count} parts:\n{process.communicate()}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


def test_the_cluster_writes_the_rows_of_the_local_run(cluster: RayCluster, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    sample = photos(PHOTOS, allow_synthetic=False).images
    for i, data in enumerate(sample + synthetic_photos(PHOTOS - len(sample))):
        (folder / f"photo{i:04d}.jpg").write_bytes(data)
    (folder / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    options = ["--policy", "center", "--part-rows", "250"]
    local = finish(embed(str(folder), "--out", str(tmp_path / "local.parquet"), *options))
    on_ray = finish(embed(str(folder), "--out", str(tmp_path / "ray.parquet"), *options, "--ray", cluster.address,
                          "--actors", "2", env=cluster.client_env))
    for summary in (local, on_ray):
        assert f"{PHOTOS} embedded, 0 already present, 1 skipped as bad" in summary
    a, b = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "ray.parquet")
    assert a.schema == b.schema
    meta = {k: v for k, v in a.schema.metadata.items() if k != b"metta.created"}
    assert meta == {k: v for k, v in b.schema.metadata.items() if k != b"metta.created"}
    a, b = a.sort_by("path"), b.sort_by("path")
    assert a.column("path").to_pylist() == b.column("path").to_pylist()
    assert a.column("sha256").to_pylist() == b.column("sha256").to_pylist()
    x = np.asarray(a.column("embedding").to_pylist(), np.float64)
    y = np.asarray(b.column("embedding").to_pylist(), np.float64)
    cosine = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    assert cosine.min() >= 0.99999, cosine.min()
    assert (tmp_path / "ray.parquet.errors.jsonl").read_text() == (tmp_path / "local.parquet.errors.jsonl").read_text()
    assert sorted(p.name for p in (tmp_path / "ray.parquet").iterdir()) == \
        [f"part-{i:05d}.parquet" for i in range(4)]


def test_a_rerun_after_the_driver_is_killed_resumes(cluster: RayCluster, small_photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    args = (str(small_photos), "--out", str(out), *SLEEPING, "--part-rows", "50", "--ray", cluster.address,
            "--actors", "2")
    first = embed(*args, env=cluster.client_env)
    wait_for_parts(out, 3, first)
    first.kill()  # SIGKILL: the driver's job ends with it
    first.communicate(timeout=60)
    kept = pq.read_table(out).num_rows
    assert 150 <= kept < PHOTOS and kept % 50 == 0, kept  # whole parts only
    stdout = finish(embed(*args, env=cluster.client_env))
    # The rerun embeds exactly what no finished part held: the killed driver lost at most its open part.
    assert f"{PHOTOS - kept} embedded, {kept} already present, 0 skipped" in stdout
    assert_each_photo_once(out, small_photos)


def test_a_node_killed_mid_run_and_every_photo_still_once(cluster: RayCluster, small_photos: Path,
                                                          tmp_path: Path) -> None:
    node = cluster.nodes[-1]
    out = tmp_path / "out.parquet"
    run = embed(str(small_photos), "--out", str(out), *SLEEPING, "--part-rows", "50", "--ray", cluster.address,
                "--actors", "2", env=cluster.client_env)
    wait_for_parts(out, 2, run)
    os.kill(node.raylet_pid(), signal.SIGKILL)  # the node is gone: its workers, actor and objects with it
    stdout = finish(run)
    assert f"{PHOTOS} embedded, 0 already present, 0 skipped" in stdout
    assert_each_photo_once(out, small_photos)
    parts = list(out.glob("part-*.parquet"))
    assert len(parts) == PHOTOS // 50 and all(pq.read_metadata(p).num_rows == 50 for p in parts)
    cluster.add_node(cpus=1)  # for what follows


def test_objects_in_a_bucket_on_the_cluster(cluster: RayCluster, s3, tmp_path: Path) -> None:
    write_photos(tmp_path / "photos", 30)
    upload(s3, "cluster", {f"in/{p.name}": p.read_bytes() for p in sorted((tmp_path / "photos").iterdir())})
    env = s3_environment(s3)
    local = finish(embed("s3://cluster/in", "--out", str(tmp_path / "local.parquet"), *SLEEPING, env=env))
    on_ray = finish(embed("s3://cluster/in", "--out", str(tmp_path / "ray.parquet"), *SLEEPING, "--ray",
                          cluster.address, "--actors", "2", env={**env, **cluster.client_env}))
    for summary in (local, on_ray):
        assert "30 embedded, 0 already present, 0 skipped" in summary
    a, b = (pq.read_table(tmp_path / f"{name}.parquet").sort_by("path") for name in ("local", "ray"))
    assert a.column("path").to_pylist() == b.column("path").to_pylist() == \
        [f"s3://cluster/in/p{i:04d}.jpg" for i in range(30)]
    assert a.column("sha256").equals(b.column("sha256"))


LIBRARY_USER = """
import json, sys
import ray, ray.data
from models import ModelOptions
from service.bulk.raydata import embed_dataset
ray.init(address=sys.argv[1], log_to_driver=False)
ds = ray.data.read_binary_files(sys.argv[2], include_paths=True)
ds = embed_dataset(ds, column="bytes", model="dummy", policy="crop_flip", samples=2, seed=7,
                   model_options=ModelOptions(mode="eager"), actors=2, label_column="path")
rows = ds.drop_columns(["bytes"]).take_all()
print(json.dumps({r["path"].rsplit("/", 1)[1]: [r["error_type"], None if r["embedding"] is None
                  else [float(v) for v in r["embedding"]]] for r in rows}))
"""


def test_embed_dataset_adds_the_local_runs_embeddings_to_a_users_dataset(cluster: RayCluster, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    write_photos(folder, 12)
    (folder / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    user = subprocess.run([sys.executable, "-c", LIBRARY_USER, cluster.address, str(folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **cluster.client_env})
    assert user.returncode == 0, user.stderr[-5000:]
    added = json.loads(user.stdout.strip().splitlines()[-1])
    finish(embed(str(folder), "--out", str(tmp_path / "local.parquet"), "--model", "dummy", "--mode", "eager",
                 "--policy", "crop_flip", "--samples", "2", "--seed", "7"))
    local = pq.read_table(tmp_path / "local.parquet")
    assert sorted(added) == sorted([p.rsplit("/", 1)[1] for p in local.column("path").to_pylist()] + ["zz-broken.jpg"])
    assert added["zz-broken.jpg"] == ["invalid_image", None]
    for path, vector in zip(local.column("path").to_pylist(), local.column("embedding").to_pylist(), strict=True):
        error, embedded = added[path.rsplit("/", 1)[1]]
        assert error is None
        np.testing.assert_allclose(embedded, vector, rtol=1e-5, atol=1e-6)
