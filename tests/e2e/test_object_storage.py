"""`metta embed s3://...` against a real S3-compatible server on loopback (moto's server mode), as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from service.testing import REPO, ServerProcess
from tests.e2e.object_storage import s3_environment, start_s3_server, upload
from tests.e2e.test_bulk_e2e import write_photos

DUMMY = ["--model", "dummy", "--mode", "eager"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    server.terminate()


def embed(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from service.cli import main; main()", "embed", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **s3_environment(server)})


def rows(out: Path) -> dict[str, tuple[str, np.ndarray]]:
    """file name → (sha256, embedding)"""
    table = pq.read_table(out)
    return {path.rsplit("/", 1)[1]: (sha, np.asarray(vector, np.float32)) for path, sha, vector in
            zip(*(table.column(c).to_pylist() for c in ("path", "sha256", "embedding")), strict=True)}


def test_a_bucket_prefix_gives_the_rows_of_the_same_photos_on_disk_and_resumes(s3: ServerProcess,
                                                                                tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    write_photos(folder, 40)
    (folder / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    upload(s3, "catalogue", {f"set/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())})
    upload(s3, "catalogue", {"set/readme.txt": b"not an image"})  # not an image extension: not listed
    options = ["--policy", "crop_flip", "--samples", "2", "--seed", "3", "--part-rows", "16", *DUMMY]
    local = embed(s3, str(folder), "--out", str(tmp_path / "local.parquet"), *options)
    remote = embed(s3, "s3://catalogue/set", "--out", str(tmp_path / "s3.parquet"), *options)
    for result in (local, remote):
        assert result.returncode == 0, result.stderr
        assert "40 embedded, 0 already present, 1 skipped as bad" in result.stdout
    on_disk, in_bucket = rows(tmp_path / "local.parquet"), rows(tmp_path / "s3.parquet")
    assert on_disk.keys() == in_bucket.keys()
    for name, (sha, vector) in on_disk.items():
        assert in_bucket[name][0] == sha
        np.testing.assert_array_equal(in_bucket[name][1], vector)
    paths = pq.read_table(tmp_path / "s3.parquet").column("path").to_pylist()
    assert sorted(paths) == [f"s3://catalogue/set/p{i:04d}.jpg" for i in range(40)]
    error = json.loads((tmp_path / "s3.parquet.errors.jsonl").read_text())
    assert error["path"] == "s3://catalogue/set/zz-broken.jpg" and error["type"] == "invalid_image"

    again = embed(s3, "s3://catalogue/set", "--out", str(tmp_path / "s3.parquet"), *options)
    assert again.returncode == 0, again.stderr
    assert "0 embedded, 40 already present, 1 skipped as bad" in again.stdout


def test_globs_and_listings_of_objects_and_a_missing_object(s3: ServerProcess, tmp_path: Path) -> None:
    write_photos(tmp_path / "photos", 6)
    upload(s3, "listed", {f"a/{p.name}": p.read_bytes() for p in sorted((tmp_path / "photos").iterdir())})
    glob = embed(s3, "s3://listed/a/p000[0-2].jpg", "--out", str(tmp_path / "glob.parquet"), *DUMMY)
    assert glob.returncode == 0, glob.stderr
    assert pq.read_table(tmp_path / "glob.parquet").column("path").to_pylist() == \
        [f"s3://listed/a/p000{i}.jpg" for i in range(3)]
    listing = tmp_path / "list.csv"
    local = tmp_path / "photos" / "p0005.jpg"
    listing.write_text(f"path\ns3://listed/a/p0003.jpg\ns3://listed/a/gone.jpg\n{local}\n")
    listed = embed(s3, "--list", str(listing), "--out", str(tmp_path / "listed.parquet"), *DUMMY)
    assert listed.returncode == 0, listed.stderr
    assert "2 embedded, 0 already present, 1 skipped as bad" in listed.stdout
    assert sorted(pq.read_table(tmp_path / "listed.parquet").column("path").to_pylist()) == \
        sorted(["s3://listed/a/p0003.jpg", str(local)])
    error = json.loads((tmp_path / "listed.parquet.errors.jsonl").read_text())
    assert (error["path"], error["type"]) == ("s3://listed/a/gone.jpg", "unreadable")
    nothing = embed(s3, "s3://listed/nowhere", "--out", str(tmp_path / "none.parquet"), *DUMMY)
    assert nothing.returncode == 2 and "no such object or prefix" in nothing.stderr
