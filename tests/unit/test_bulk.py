"""The pieces of `metta embed --out OUT.parquet`: input listing, streaming batches, the dataset, request splitting."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from models import ModelOptions, create_model
from service.bulk.dataset import Dataset, Row, RunSettings
from service.bulk.files import UsageError, find_images
from service.bulk.sources import read_source
from service.client import Limits, plan_requests
from service.core.embedding import EmbedOptions, ImageJob, embed_stream
from service.core.policies import make_policy
from service.core.render import render_view


@pytest.fixture(scope="module")
def dummy():
    return create_model("dummy", ModelOptions(mode="eager"))


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_folders_are_walked_recursively_with_image_extensions_in_any_case(tmp_path: Path) -> None:
    for name in ("b.JPEG", "a.png", "sub/c.Jpg", "sub/deeper/d.webp", "notes.txt", "sub/e.tif"):
        touch(tmp_path / "photos" / name)
    touch(tmp_path / "single.bin")
    folder = str(tmp_path / "photos")
    found = find_images([folder, str(tmp_path / "single.bin"), folder]).files
    assert found == [os.path.join(folder, "a.png"), os.path.join(folder, "b.JPEG"),
                     os.path.join(folder, "sub", "c.Jpg"), os.path.join(folder, "sub", "e.tif"),
                     os.path.join(folder, "sub", "deeper", "d.webp"),  # a folder's files, then its subfolders
                     str(tmp_path / "single.bin")]  # each once; a file argument as named
    assert find_images([folder], "sub/*").files == found[2:5]
    assert find_images([folder], "*.png").files == [os.path.join(folder, "a.png")]
    with pytest.raises(UsageError, match="no such file"):
        find_images([str(tmp_path / "missing")])


def images(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, 50 + 7 * i, 80), dtype=torch.uint8, generator=generator) for i in range(count)]


@pytest.mark.parametrize("max_batch_crops", [1, 5, 32])
def test_embed_stream_gives_each_images_own_views_statistics_and_pulls_lazily(dummy, max_batch_crops: int) -> None:
    pictures = images(7)
    options = EmbedOptions(3, make_policy("crop_flip"), 4, return_variance=True)

    def by_hand(picture: torch.Tensor) -> np.ndarray:  # the image's three views, embedded one at a time
        job = ImageJob(picture, options, dummy)
        return np.stack([dummy.embed_views(render_view(job.source, view, dummy.spec.preprocess)[None])[0].numpy()
                         for view in job.render_views]).astype(np.float64)

    expected = [by_hand(picture) for picture in pictures]
    pulled: list[int] = []
    yielded: list[int] = []

    def jobs():
        for i, picture in enumerate(pictures):
            pulled.append(i)
            # Bounded: a new image is only asked for when a batch has room, never far ahead of the results.
            assert len(pulled) - len(yielded) <= max_batch_crops + 1
            yield i, ImageJob(picture, options, dummy)

    for key, result in embed_stream(dummy, jobs(), max_batch_crops=max_batch_crops):
        yielded.append(key)
        np.testing.assert_allclose(result.embedding, expected[key].mean(axis=0), rtol=1e-5, atol=1e-5)
        assert result.variance is not None
        np.testing.assert_allclose(result.variance, expected[key].var(axis=0, ddof=1), rtol=1e-4, atol=1e-6)
    assert yielded == list(range(7))


RUN = RunSettings("dummy", "f00d", "multiscale", 3, 0, variance=True)


def rows(count: int, start: int = 0) -> list[Row]:
    return [Row(f"img/{i}.jpg", f"{i:064x}", np.full(4, i, np.float32), np.full(4, 0.5, np.float32))
            for i in range(start, start + count)]


def test_parts_are_complete_small_files_with_the_run_in_their_metadata(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    dataset = Dataset(out, RUN, 4, part_rows=10)
    dataset.open(overwrite=False)
    assert pq.read_table(out).num_rows == 0  # readable from the start
    for row in rows(25):
        dataset.add(row)
    assert sorted(os.listdir(out)) == ["part-00000.parquet", "part-00001.parquet"]  # the 5 rows left are buffered
    dataset.flush()
    table = pq.read_table(out)
    assert table.num_rows == 25 and table.column("path").to_pylist() == [f"img/{i}.jpg" for i in range(25)]
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[4]"
    assert str(table.schema.field("variance").type) == "fixed_size_list<element: float>[4]"
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False))[3], [3] * 4)
    metadata = pq.read_schema(out / "part-00002.parquet").metadata
    assert {k: metadata[k] for k in (b"metta.model", b"metta.model_fingerprint", b"metta.policy", b"metta.samples",
                                     b"metta.seed")} == {b"metta.model": b"dummy", b"metta.model_fingerprint": b"f00d",
                                                         b"metta.policy": b"multiscale", b"metta.samples": b"3",
                                                         b"metta.seed": b"0"}
    assert metadata[b"metta.created"].startswith(b"20")


def test_resume_skips_what_is_there_and_drops_an_unfinished_part(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    first = Dataset(out, RUN, 4, part_rows=10)
    first.open(overwrite=False)
    for row in rows(12):
        first.add(row)  # killed here: one part written, two rows only in memory
    (out / ".part-00001.parquet.tmp").write_bytes(b"half a part")
    again = Dataset(out, RUN, 4, part_rows=10)
    again.open(overwrite=False)
    assert again.known == {r.path: r.sha256 for r in rows(10)}
    assert not (out / ".part-00001.parquet.tmp").exists() and again.next_part == 1
    for row in rows(2, start=10):
        again.add(row)
    again.flush()
    assert sorted(pq.read_table(out).column("path").to_pylist()) == sorted(r.path for r in rows(12))


@pytest.mark.parametrize("other", [
    RunSettings("dummy", "beef", "multiscale", 3, 0, variance=True),  # another model fingerprint
    RunSettings("dummy", "f00d", "multiscale", 4, 0, variance=True),
    RunSettings("dummy", "f00d", "multiscale", 3, 1, variance=True),
    RunSettings("dummy", "f00d", "multiscale", 3, 0),  # no variance column
])
def test_other_settings_on_an_existing_dataset_are_refused_unless_overwritten(tmp_path: Path, other) -> None:
    out = tmp_path / "out.parquet"
    dataset = Dataset(out, RUN, 4)
    dataset.open(overwrite=False)
    dataset.add(rows(1)[0])
    dataset.flush()
    with pytest.raises(UsageError, match=r"other settings.*--overwrite"):
        Dataset(out, other, 4).open(overwrite=False)
    fresh = Dataset(out, other, 4)
    fresh.open(overwrite=True)
    assert fresh.known == {} and os.listdir(out) == []


def test_a_folder_with_foreign_files_is_never_resumed_or_deleted(tmp_path: Path) -> None:
    out = tmp_path / "photos"
    touch(out / "holiday.jpg")
    with pytest.raises(UsageError, match=r"holiday\.jpg"):
        Dataset(out, RUN, 4).open(overwrite=True)
    assert (out / "holiday.jpg").exists()


def test_requests_are_split_by_images_crops_and_bytes() -> None:
    limits = Limits(max_images=4, max_body_bytes=10_000 + 8_192, max_request_crops=9, default_samples=3)
    assert plan_requests([100] * 10, 1, limits) == [range(0, 4), range(4, 8), range(8, 10)]
    assert plan_requests([100] * 5, 3, limits) == [range(0, 3), range(3, 5)]  # 9 crops at S=3: 3 images
    assert plan_requests([100] * 5, 1, limits, images_per_request=2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert plan_requests([6_000, 6_000, 20_000, 10], 1, limits) == [range(0, 1), range(1, 2), range(2, 3),
                                                                    range(3, 4)]  # too big alone: the server says


def test_objects_in_a_store_are_read_ahead_on_threads_of_their_own(tmp_path: Path, monkeypatch, dummy) -> None:
    """A store's round trip must not hold a decoding thread: with 2 decoders, many objects are in flight."""
    import io
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from service.bulk import local

    uris = []
    for i in range(24):
        buffer = io.BytesIO()
        Image.new("RGB", (40 + i, 30), (i, 2 * i, 3 * i)).save(buffer, "PNG")
        (tmp_path / f"p{i:02d}.png").write_bytes(buffer.getvalue())
        uris.append(f"file://{tmp_path}/p{i:02d}.png")
    in_flight, most, lock = 0, 0, threading.Lock()

    def slow_read(path: str, known, max_bytes: int):  # a store answering in 50 ms
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.05)
        with lock:
            in_flight -= 1
        return read_source(path, known, max_bytes)

    monkeypatch.setattr(local, "read_source", slow_read)
    options = EmbedOptions(1, make_policy("center"), 0)
    limits = local.DecodeLimits(10**8, 10**5, 1 << 20)
    with ThreadPoolExecutor(2) as pool:
        started = time.perf_counter()
        items = list(local.prepare_files(uris, {}, dummy, options, limits, pool=pool, ahead=8))
        seconds = time.perf_counter() - started
    assert [item.path for item in items] == uris and all(item.job is not None for item in items)
    assert most >= 4, most  # 2 at most when the decoding threads read
    assert seconds < 24 * 0.05 / 3, seconds
