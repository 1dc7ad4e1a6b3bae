"""Hostile inputs and outputs of a bulk run: special files, huge files, odd names, spellings of one file,
changed files, two runs on one output, a full disk."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from service.bulk.dataset import Dataset, OutputError, Row, RunSettings
from service.bulk.files import NOT_A_FILE, TOO_LARGE, find_images, read_input
from service.bulk.lock import OutputBusy, lock_path, output_lock

RUN = RunSettings("dummy", "f00d", "multiscale", 3, 0)
NON_UTF8 = os.fsdecode(b"caf\xe9-\xff.jpg")  # Latin-1 bytes: not UTF-8


def row(path: str, sha: str = "a" * 64, value: float = 0.0) -> Row:
    return Row(path, sha, np.full(4, value, np.float32))


@pytest.mark.timeout(30)
def test_special_files_are_skipped_and_reported_never_opened(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(b"x")
    os.mkfifo(folder / "pipe.jpg")  # opening it for reading would block for ever
    (folder / "zero.jpg").symlink_to("/dev/zero")  # reading it would never end
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    inputs = find_images([str(folder)])
    assert inputs.files == [str(folder / "ok.jpg")]
    reasons = {Path(path).name: (kind, message) for path, kind, message in inputs.skipped}
    assert reasons["pipe.jpg"][0] == NOT_A_FILE and "FIFO" in reasons["pipe.jpg"][1]
    assert reasons["zero.jpg"] == (NOT_A_FILE, f"{folder / 'zero.jpg'} (a link to /dev/zero) is a character "
                                               "device, not a regular file: skipped")
    assert reasons["dangling.jpg"][0] == "unreadable"
    # A name swapped for a FIFO after the listing: the read refuses it at once instead of blocking.
    assert read_input(str(folder / "pipe.jpg"), {}, 100).error[0] == NOT_A_FILE  # type: ignore[index]


def test_reads_are_bounded_by_the_body_limit(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 1001)
    refused = read_input(str(big), {}, 1000)
    assert refused.data is None and refused.error is not None and refused.error[0] == TOO_LARGE
    assert "1000-byte body limit" in refused.error[1]
    assert read_input(str(big), {}, 1001).data == b"\xff" * 1001


def test_every_spelling_of_a_file_is_one_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"a")
    (tmp_path / "link").symlink_to(folder)
    (folder / "alias.jpg").symlink_to(folder / "a.jpg")
    monkeypatch.chdir(tmp_path)
    inputs = find_images(["photos", "./photos/", str(folder), "link", "photos/a.jpg", "link/../photos/a.jpg"])
    assert inputs.files == [str(folder / "a.jpg")] and inputs.skipped == []


def test_a_name_that_is_not_utf8_is_kept_exactly_and_resumed(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    name = str(tmp_path / NON_UTF8)
    dataset = Dataset(out, RUN, 4)
    dataset.open(overwrite=False)
    dataset.add(row(name))
    dataset.finish()
    table = pq.read_table(out)
    assert table.column("path_bytes").to_pylist() == [os.fsencode(name)]
    assert table.column("path").to_pylist() == [os.fsencode(name).decode("utf-8", "backslashreplace")]
    assert table.column("path").to_pylist()[0].endswith("caf\\xe9-\\xff.jpg")
    again = Dataset(out, RUN, 4)
    again.open(overwrite=False)
    assert again.known == {name: "a" * 64}


def test_a_changed_file_replaces_its_stale_row(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    first = Dataset(out, RUN, 4, part_rows=2)
    first.open(overwrite=False)
    for i, path in enumerate(["/x/a.jpg", "/x/b.jpg", "/x/c.jpg"]):
        first.add(row(path, f"{i:064x}", i))
    first.finish()
    second = Dataset(out, RUN, 4)
    second.open(overwrite=False)
    second.add(row("/x/b.jpg", "f" * 64, 9.0))  # b.jpg was edited
    second.finish()
    assert second.replaced == 1
    table = pq.read_table(out).sort_by("path")
    assert table.column("path").to_pylist() == ["/x/a.jpg", "/x/b.jpg", "/x/c.jpg"]
    assert table.column("sha256").to_pylist()[1] == "f" * 64
    assert table.column("embedding").to_pylist()[1] == [9.0] * 4


def test_a_run_killed_before_removing_the_stale_row_is_mended_by_the_next(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    first = Dataset(out, RUN, 4)
    first.open(overwrite=False)
    first.add(row("/x/a.jpg", "0" * 64))
    first.finish()
    second = Dataset(out, RUN, 4)
    second.open(overwrite=False)
    second.add(row("/x/a.jpg", "1" * 64))
    second.flush()  # killed here: the new row is written, the old one not yet removed
    assert pq.read_table(out).num_rows == 2
    third = Dataset(out, RUN, 4)
    third.open(overwrite=False)
    assert pq.read_table(out).column("sha256").to_pylist() == ["1" * 64]
    assert third.known == {"/x/a.jpg": "1" * 64}


def test_a_second_run_on_one_output_is_refused_while_the_first_holds_it(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    busy = rf"another metta embed run \(pid {os.getpid()}, lock .*out\.parquet\.lock"
    with output_lock(out), pytest.raises(OutputBusy, match=busy), output_lock(out):
        pass
    with output_lock(out):  # released with its holder
        assert lock_path(out).exists()


def test_a_full_disk_is_an_output_error_that_keeps_the_written_parts(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.parquet"
    dataset = Dataset(out, RUN, 4, part_rows=2)
    dataset.open(overwrite=False)
    real_write = pq.write_table
    writes = []

    def write_until_full(table, where, **kwargs):
        writes.append(table.num_rows)
        if len(writes) > 1:
            where.write(b"PAR1 half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", write_until_full)
    dataset.add(row("/x/a.jpg"))
    dataset.add(row("/x/b.jpg"))
    dataset.add(row("/x/c.jpg"))
    with pytest.raises(OutputError, match=r"No space left on device; the 2 rows this run wrote before are kept"):
        dataset.add(row("/x/d.jpg"))
    assert dataset.written == 2 == pq.read_table(out).num_rows
    assert sorted(os.listdir(out)) == ["part-00000.parquet"]  # the half-written temporary is gone
