"""Where a bulk run's inputs come from: local paths, globs, listings of paths, and object storage URIs.

Every runner (in-process, `--server`, `--ray`) lists with `find_inputs` and reads with `read_source`, so the
rows, and resume, are the same whoever runs the job. Arguments are taken in order, each input once:
- a local file or folder (`files.find_images`: a folder is walked, a file taken as given; local files are known
  by their canonical path, special files are skipped and reported);
- a glob that names no existing path (`'photos/**/*.jpg'`, quoted so the shell leaves it): its matches, sorted,
  a matched folder walked;
- a URI such as `s3://bucket/prefix`, through pyarrow's filesystems: an object is taken as given, a prefix is
  listed recursively (image extensions; `--glob` as for a folder), a glob in the key (`s3://b/photos/*.jpg`) is
  matched against the keys below the part before it.
A listing (`--list FILE`: a .txt of one path per line, or a .csv or .parquet with a `path` column; the file
itself may be a URI) adds its entries as given, unchecked: a catalogue of millions is what it is for, so a
missing entry becomes a bad file in the errors file rather than a look-up per entry before the run.

Object storage is configured as pyarrow and the AWS SDK read their environment: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL for an S3-compatible server.
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import glob
import io
import os
import posixpath
import re
from collections.abc import Mapping, Sequence

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from service.bulk.files import (
    IMAGE_EXTENSIONS,
    TOO_LARGE,
    UNREADABLE,
    InputFile,
    Inputs,
    UsageError,
    canonical_path,
    display_path,
    find_images,
    hashed_input,
    read_input,
)

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB = re.compile(r"[*?[]")
_BUCKETED = ("s3", "gs", "gcs")  # schemes whose first path segment is a bucket: one filesystem per bucket
LISTING_SUFFIXES = (".txt", ".csv", ".parquet")


def is_uri(path: str) -> bool:
    return _URI.match(path) is not None


def find_inputs(arguments: Sequence[str], pattern: str | None = None, listings: Sequence[str] = (), *,
                cwd: str | None = None) -> Inputs:
    """Every input (a canonical local path or a URI), in the order given, each once; and what is skipped.

    A listing's relative entries are relative to `cwd` (default: this process's working directory)."""
    inputs = Inputs()
    seen: set[str] = set()

    def take(found: Inputs) -> None:
        for path in found.files:
            if path not in seen:
                seen.add(path)
                inputs.files.append(path)
        inputs.skipped.extend(found.skipped)

    for argument in arguments:
        if is_uri(argument):
            take(Inputs(_list_uri(argument, pattern)))
        elif not os.path.lexists(argument) and _GLOB.search(argument):
            matches = sorted(glob.glob(argument, recursive=True))
            if not matches:
                raise UsageError(f"{display_path(argument)}: the pattern matches nothing")
            take(find_images(matches, pattern))
        else:
            take(find_images([argument], pattern))
    for listing in listings:
        # as given, unchecked (read_input refuses what is not a regular file when it opens it)
        take(Inputs([path if is_uri(path) else canonical_path(os.path.join(cwd or os.getcwd(), path))
                     for path in read_listing(listing)]))
    return inputs


def read_listing(listing: str) -> list[str]:
    """The paths a .txt (one per line; blank lines and '#' comments skipped), .csv or .parquet file names."""
    suffix = os.path.splitext(listing)[1].lower()
    if suffix not in LISTING_SUFFIXES:
        raise UsageError(f"--list {listing}: a listing is a {', '.join(LISTING_SUFFIXES)} file")
    try:
        data = _read_bytes(listing)
    except OSError as exc:
        raise UsageError(f"--list {listing}: {exc.strerror or exc}") from None
    if suffix == ".parquet":
        table = pq.read_table(io.BytesIO(data))
        if "path" not in table.column_names:
            raise UsageError(f"--list {listing}: no `path` column (columns: {', '.join(table.column_names)})")
        return [str(path) for path in table.column("path").to_pylist() if path]
    text = data.decode("utf-8")
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if "path" not in (reader.fieldnames or []):
            raise UsageError(f"--list {listing}: no `path` column in its header ({reader.fieldnames})")
        return [row["path"] for row in reader if row["path"]]
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def read_source(path: str, known: Mapping[str, str], max_bytes: int) -> InputFile:
    """Read (at most `max_bytes`) and hash one input, a local path or a URI; no bytes when `known[path]` is its hash."""
    if not is_uri(path):
        return read_input(path, known, max_bytes)
    try:
        filesystem, key = _locate(path)
        with filesystem.open_input_file(key) as file:
            size = file.size()
            if size > max_bytes:
                return InputFile(path, error=(TOO_LARGE, f"{path}: larger than the {max_bytes}-byte body limit "
                                                         "(--max-body-bytes)"))
            data = bytes(file.read(size))
    except OSError as exc:
        return InputFile(path, error=(UNREADABLE, f"{path} could not be read: {exc.strerror or exc}"))
    return hashed_input(path, data, known)


def _read_bytes(path: str) -> bytes:
    if not is_uri(path):
        with open(path, "rb") as file:
            return file.read()
    filesystem, key = _locate(path)
    with filesystem.open_input_file(key) as file:
        return bytes(file.read())


def _list_uri(uri: str, pattern: str | None) -> list[str]:
    """An object as given; a prefix's image objects (recursively); a glob's matching objects, sorted."""
    scheme = uri.split("://", 1)[0]
    filesystem, key = _locate(uri)
    magic = _GLOB.search(key)
    if magic:
        base = key[:magic.start()].rpartition("/")[0]
        keys = [info.path for info in _files_below(filesystem, base) if fnmatch.fnmatchcase(info.path, key)]
        if not keys:
            raise UsageError(f"{uri}: the pattern matches nothing")
        return [f"{scheme}://{k}" for k in sorted(keys)]
    info = filesystem.get_file_info(key)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type != pafs.FileType.Directory:
        raise UsageError(f"{uri}: no such object or prefix")
    keys = []
    for found in _files_below(filesystem, key.rstrip("/")):
        name = posixpath.basename(found.path)
        below = posixpath.relpath(found.path, key.rstrip("/"))
        if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        if pattern is None or fnmatch.fnmatch(below, pattern) or fnmatch.fnmatch(name, pattern):
            keys.append(found.path)
    return [f"{scheme}://{k}" for k in sorted(keys)]


def _files_below(filesystem: pafs.FileSystem, key: str) -> list[pafs.FileInfo]:
    infos = filesystem.get_file_info(pafs.FileSelector(key, recursive=True, allow_not_found=True))
    return [info for info in infos if info.type == pafs.FileType.File]


def _locate(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path in it; S3 and GCS filesystems are made once per bucket (making one may ask
    the server for the bucket's region: once, not once per object)."""
    scheme, rest = uri.split("://", 1)
    if scheme.lower() in _BUCKETED:
        bucket = rest.split("/", 1)[0]
        return _bucket_filesystem(f"{scheme}://{bucket}"), rest
    filesystem, path = pafs.FileSystem.from_uri(uri)
    return filesystem, path


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(root: str) -> pafs.FileSystem:
    try:
        return pafs.FileSystem.from_uri(root)[0]
    except (OSError, ValueError) as exc:
        raise UsageError(f"{root}: {exc}") from None
