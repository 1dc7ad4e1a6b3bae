"""`metta embed PATH... --out OUT.parquet` in-process with the dummy model: dataset, bad files, resume, exit codes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import service.bulk.local
from models import ModelOptions, create_model
from service.cli import main
from service.core.decode import decode_image
from service.core.embedding import embed

DUMMY = ["--model", "dummy", "--mode", "eager"]


def write_photos(folder: Path, count: int, start: int = 0) -> list[Path]:
    paths = []
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        pixels = rng.integers(0, 256, (40 + i % 13, 60 + i % 7, 3), dtype=np.uint8)
        path = folder / ("sub" if i % 3 == 0 else "") / f"photo{i:03d}.{'JPEG' if i % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG" if i % 2 else "PNG")
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def metta(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", *args])
    code = exit_info.value.code
    return code if isinstance(code, int) else (0 if code is None else 2)


def test_a_folder_becomes_a_dataset_with_bad_files_listed_and_the_library_numbers(tmp_path, capsys) -> None:
    photos = write_photos(tmp_path / "photos", 12)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out.parquet"
    assert metta(str(tmp_path / "photos"), "--out", str(out), "--samples", "4", "--policy", "crop_flip",
                 "--seed", "7", "--dispersion", "--part-rows", "5", *DUMMY) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "12 embedded, 0 already present, 1 skipped as bad" in summary
    table = pq.read_table(out)
    assert table.num_rows == 12 and len(list(out.glob("part-*.parquet"))) == 3  # 5 + 5 + 2 rows
    assert table.column_names == ["path", "sha256", "embedding", "dispersion"]
    bad = [json.loads(line) for line in (tmp_path / "out.parquet.errors.jsonl").read_text().splitlines()]
    assert bad == [{"path": str(tmp_path / "photos" / "broken.jpg"), "type": "invalid_image",
                    "message": bad[0]["message"]}] and "broken.jpg" in bad[0]["message"]
    # The same numbers as the library call on the same files.
    model = create_model("dummy", ModelOptions(mode="eager"))
    decoded = [decode_image(p.read_bytes(), max_pixels=10**8, max_side=10**5) for p in photos]
    expected = embed(model, decoded, samples=4, policy="crop_flip", seed=7, return_dispersion=True)
    by_path = dict(zip(table.column("path").to_pylist(), table.column("embedding").to_pylist(), strict=True))
    for path, vector in zip(photos, expected.embeddings, strict=True):
        np.testing.assert_allclose(by_path[str(path)], vector, rtol=1e-6, atol=1e-6)


def test_a_second_run_skips_what_is_there_and_embeds_only_new_files(tmp_path, capsys) -> None:
    folder = tmp_path / "photos"
    write_photos(folder, 6)
    out = str(tmp_path / "out.parquet")
    assert metta(str(folder), "--out", out, *DUMMY) == 0
    assert metta(str(folder), "--out", out, *DUMMY) == 0
    assert "0 embedded, 6 already present, 0 skipped as bad" in capsys.readouterr().out
    write_photos(folder, 2, start=6)
    assert metta(str(folder), "--out", out, *DUMMY) == 0
    assert "2 embedded, 6 already present" in capsys.readouterr().out
    paths = pq.read_table(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 8


def test_other_options_on_an_existing_dataset_exit_2_and_overwrite_starts_over(tmp_path, capsys) -> None:
    write_photos(tmp_path / "photos", 3)
    out = str(tmp_path / "out.parquet")
    assert metta(str(tmp_path / "photos"), "--out", out, *DUMMY) == 0
    assert metta(str(tmp_path / "photos"), "--out", out, "--samples", "5", *DUMMY) == 2
    assert "samples: dataset 3, this run 5" in capsys.readouterr().err
    assert metta(str(tmp_path / "photos"), "--out", out, "--samples", "5", "--overwrite", *DUMMY) == 0
    assert pq.read_schema(next(Path(out).glob("part-*.parquet"))).metadata[b"metta.samples"] == b"5"


def test_exit_codes_for_nothing_found_nothing_embeddable_and_bad_usage(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert metta(str(tmp_path / "empty"), "--out", str(tmp_path / "a.parquet"), *DUMMY) == 2
    assert metta(str(tmp_path / "missing"), "--out", str(tmp_path / "a.parquet"), *DUMMY) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    assert metta(str(tmp_path / "bad"), "--out", str(tmp_path / "b.parquet"), *DUMMY) == 1
    assert metta(str(tmp_path / "bad"), "--out", str(tmp_path / "c.npy"), "--server", "http://x", *DUMMY) == 2
    assert metta(str(tmp_path / "bad"), "--out", str(tmp_path / "d.parquet"), "--policy", "center",
                 "--variance", *DUMMY) == 2
    assert "--server need a dataset" in capsys.readouterr().err


def test_ctrl_c_keeps_the_finished_rows_and_exits_130(tmp_path, monkeypatch, capsys) -> None:
    write_photos(tmp_path / "photos", 8)
    real_stream = service.bulk.local.embed_stream

    def interrupted(*args, **kwargs):
        for count, item in enumerate(real_stream(*args, **kwargs)):
            if count == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(service.bulk.local, "embed_stream", interrupted)
    out = tmp_path / "out.parquet"
    assert metta(str(tmp_path / "photos"), "--out", str(out), *DUMMY) == 130
    assert pq.read_table(out).num_rows == 3
    assert "3 embedded" in capsys.readouterr().out
    monkeypatch.setattr(service.bulk.local, "embed_stream", real_stream)
    assert metta(str(tmp_path / "photos"), "--out", str(out), *DUMMY) == 0
    assert "5 embedded, 3 already present" in capsys.readouterr().out


def test_npy_output_keeps_todays_behaviour(tmp_path, capsys) -> None:
    photos = write_photos(tmp_path, 2)
    out = tmp_path / "means.npy"
    main(["embed", *map(str, photos), "--out", str(out), "--samples", "2", "--variance", *DUMMY])
    assert np.load(out).shape == (2, 16) and np.load(tmp_path / "means.variance.npy").shape == (2, 16)
    assert "means →" in capsys.readouterr().out
