"""Real processes: `metta embed` killed with SIGKILL and resumed; `--server` against a real server; `openai`."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from openai import OpenAI
from PIL import Image

from service.cli import main
from service.testing import REPO, ServerProcess, start_server

KEY = "e2e-secret-key"
DUMMY = ["--model", "dummy", "--mode", "eager"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("server"), *DUMMY, "--device", "cpu", "--max-images", "8",
                        env={"METTA_API_KEYS": KEY})
    yield proc
    assert proc.terminate() == 0, proc.log()


def write_photos(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (48 + i % 11, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i:04d}.jpg", quality=90)


def embed_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", "from service.cli import main; main()", "embed", *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_mid_run_then_resume_redoes_at_most_one_part_and_keeps_every_image_once(tmp_path: Path) -> None:
    write_photos(tmp_path / "photos", 120)
    out = tmp_path / "out.parquet"
    # 20 ms per crop (a sleeping test backbone): about 2.5 s of work, so the kill lands mid-run.
    args = (str(tmp_path / "photos"), "--out", str(out), "--model", "sleep:20000", "--mode", "eager",
            "--policy", "center", "--part-rows", "10")
    first = embed_cli(*args)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < 3 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.kill()  # SIGKILL: no cleanup of any kind
    first.communicate(timeout=30)
    assert first.returncode == -9, "the run ended before the kill: make it slower"
    kept = pq.read_table(out).num_rows  # readable right after the kill
    assert 30 <= kept < 120 and kept % 10 == 0  # whole parts only

    second = embed_cli(*args)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr
    # The resumed run embeds exactly what no finished part held: the killed run lost at most its open part.
    assert f"{120 - kept} embedded, {kept} already present, 0 skipped" in stdout
    paths = pq.read_table(out).column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in (tmp_path / "photos").glob("*.jpg"))  # each exactly once
    assert not list(out.glob(".*"))


def test_server_mode_writes_the_same_dataset_as_the_local_run(server: ServerProcess, tmp_path: Path, capsys) -> None:
    write_photos(tmp_path / "photos", 21)
    (tmp_path / "photos" / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "key").write_text(KEY + "\n")
    remote, local = tmp_path / "remote.parquet", tmp_path / "local.parquet"
    options = ["--samples", "3", "--policy", "crop_flip", "--seed", "9", "--variance"]
    for out, extra in ((remote, ["--server", server.url, "--api-key-file", str(tmp_path / "key"),
                                 "--images-per-request", "4", "--concurrency", "3"]), (local, DUMMY)):
        with pytest.raises(SystemExit) as exit_info:
            main(["embed", str(tmp_path / "photos"), "--out", str(out), *options, *extra])
        assert exit_info.value.code == 0
        assert "21 embedded, 0 already present, 1 skipped as bad" in capsys.readouterr().out
    a, b = pq.read_table(remote), pq.read_table(local)
    assert a.schema.metadata[b"metta.model_fingerprint"] == b.schema.metadata[b"metta.model_fingerprint"]
    remote_vectors = dict(zip(a.column("path").to_pylist(), a.column("embedding").to_pylist(), strict=True))
    for path, vector in zip(b.column("path").to_pylist(), b.column("embedding").to_pylist(), strict=True):
        x, y = np.asarray(vector), np.asarray(remote_vectors[path])
        assert x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) >= 0.9999, path
    assert "zz-broken.jpg" in (tmp_path / "remote.parquet.errors.jsonl").read_text()


def test_the_official_openai_client_with_its_default_encoding_and_with_float(server: ServerProcess) -> None:
    photos = []
    for i in range(3):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(buffer, "PNG")
        photos.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    default = client.embeddings.create(model="dummy", input=photos, extra_body={"seed": 4})  # sends base64
    floats = client.embeddings.create(model="dummy", input=photos, encoding_format="float", extra_body={"seed": 4})
    assert [d.index for d in default.data] == [0, 1, 2] and default.model == "dummy"
    assert default.usage.prompt_tokens == 0 and default.usage.total_tokens == 0
    for a, b in zip(default.data, floats.data, strict=True):
        assert len(a.embedding) == 16
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=1e-6)
    assert [m.id for m in client.models.list().data] == ["dummy"]
