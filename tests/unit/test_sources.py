"""The inputs of a bulk run beyond a folder: globs, listings (.txt, .csv, .parquet), URIs told from paths."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.bulk.files import UsageError
from service.bulk.sources import find_inputs, is_uri, read_listing, read_source

LIMIT = 1 << 20


def files(*arguments: str, listings: tuple[str, ...] = ()) -> list[str]:
    return find_inputs(arguments, listings=listings).files


def touch(path: Path, data: bytes = b"x") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def test_a_glob_that_names_no_path_is_expanded_and_its_folders_walked(tmp_path: Path) -> None:
    a = touch(tmp_path / "2024" / "a.jpg")
    b = touch(tmp_path / "2025" / "deep" / "b.png")
    touch(tmp_path / "2025" / "notes.txt")
    c = touch(tmp_path / "2026" / "c.jpg")
    assert files(str(tmp_path / "202[45]")) == [a, b]  # matched folders, walked
    assert files(str(tmp_path / "**" / "*.jpg")) == [a, c]  # matched files, sorted
    assert files(str(tmp_path / "*" / "*.jpg"), a) == [a, c]  # each input once
    with pytest.raises(UsageError, match="matches nothing"):
        files(str(tmp_path / "*.webp"))
    # A path that exists is taken as itself even when its name looks like a pattern.
    odd = touch(tmp_path / "odd[1].jpg")
    assert files(odd) == [odd]


def test_listings_in_text_csv_and_parquet_add_their_entries_as_given(tmp_path: Path) -> None:
    a, b = touch(tmp_path / "a.jpg"), touch(tmp_path / "b.jpg")
    missing = str(tmp_path / "gone.jpg")
    (tmp_path / "list.txt").write_text(f"# the catalogue\n{a}\n\n{missing}\n")
    (tmp_path / "list.csv").write_text(f"label,path\ncat,{b}\ndog,{a}\n")
    pq.write_table(pa.table({"path": [b, "s3://bucket/c.jpg"]}), tmp_path / "list.parquet")
    listings = [str(tmp_path / name) for name in ("list.txt", "list.csv", "list.parquet")]
    assert files(listings=tuple(listings)) == [a, missing, b, "s3://bucket/c.jpg"]
    # an entry that is gone is not looked up first: reading it says so, in the errors file
    assert read_source(missing, {}, LIMIT).error[0] == "unreadable"  # type: ignore[index]
    (tmp_path / "bad.csv").write_text("file\nx.jpg\n")
    with pytest.raises(UsageError, match="no `path` column"):
        read_listing(str(tmp_path / "bad.csv"))
    with pytest.raises(UsageError, match="a listing is a"):
        read_listing(str(tmp_path / "list.json"))


def test_uris_are_told_from_paths_and_read_through_pyarrow(tmp_path: Path) -> None:
    assert is_uri("s3://bucket/key.jpg") and is_uri("gs://b/k") and is_uri("file:///tmp/x.jpg")
    assert not is_uri("photos/s3:/x.jpg") and not is_uri("/abs/path.jpg") and not is_uri("C.jpg")
    path = touch(tmp_path / "p.jpg", b"pixels")
    uri = "file://" + os.path.abspath(path)
    read = read_source(uri, {}, LIMIT)
    assert (read.path, read.data) == (uri, b"pixels")
    assert read_source(uri, {uri: read.sha256}, LIMIT).data is None  # already in the dataset: bytes dropped
    assert files("file://" + str(tmp_path)) == [uri]  # a folder URI is listed like a folder
    assert read_source(uri, {}, 3).error[0] == "payload_too_large"  # type: ignore[index]
