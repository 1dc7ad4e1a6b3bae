"""The output of a bulk run: a Parquet dataset directory that is valid at every moment.

Rows are buffered and written as part files of at most `part_rows` rows; each part is written under a
hidden temporary name (pyarrow's dataset discovery skips names starting with '.') and renamed once
complete, so `pyarrow.parquet.read_table(OUT)` never sees half a part, even after `kill -9`. Every part
carries the run's settings as schema metadata; a later run resumes only when they match, skipping the
files whose (canonical path, sha256) the dataset already holds, and at most the one unfinished part is redone.

A file whose content changed since its row was written is embedded again and its stale row is *replaced*:
the new row goes into a new part, then each older part holding a superseded row is rewritten without it
(temporary name, rename). A run killed between the two leaves both rows; the next run removes the older
one when it opens the dataset, so a path has one row once any run has ended or opened.

Paths: `path` is the canonical path as UTF-8 text (bytes of a name that are not UTF-8 written as `\\xNN`),
`path_bytes` the same name exactly as the file system holds it; resume compares `path_bytes`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from service.bulk.files import UsageError, display_path, path_bytes

PART_ROWS = 1_000
_PART = re.compile(r"part-(\d{5,})\.parquet")
_TEMP = re.compile(r"\.part-\d{5,}\.parquet\.tmp")
IDENTITY = "resolved-path,sha256"  # how rows are matched to files on resume (datasets keyed otherwise are refused)


class OutputError(Exception):
    """Writing the dataset or its errors file failed (a full disk, lost permissions): exit code 1."""


@dataclass(frozen=True)
class RunSettings:
    """What makes two runs' embeddings comparable; stored in every part, compared on resume."""

    model: str
    model_fingerprint: str
    policy: str
    samples: int
    seed: int
    normalize: bool = False
    variance: bool = False
    dispersion: bool = False

    def metadata(self) -> dict[str, str]:
        return {
            "metta.model": self.model,
            "metta.model_fingerprint": self.model_fingerprint,
            "metta.policy": self.policy,
            "metta.samples": str(self.samples),
            "metta.seed": str(self.seed),
            "metta.identity": IDENTITY,
            "metta.options": json.dumps(
                {"normalize": self.normalize, "variance": self.variance, "dispersion": self.dispersion},
                sort_keys=True),
        }


@dataclass
class Row:
    path: str  # canonical path (files.canonical_path); may hold surrogate escapes of non-UTF-8 bytes
    sha256: str
    embedding: np.ndarray  # (dim,) float32
    variance: np.ndarray | None = None
    dispersion: float | None = None


def errors_path(root: Path) -> Path:
    """Bad files are listed beside the dataset (inside it, a reader would try to open the log as a part)."""
    return root.with_name(root.name + ".errors.jsonl")


class Dataset:
    """One run's writer: open() checks or clears what is there; add() buffers; flush() writes a part;
    finish() writes the rest and removes the rows this run superseded."""

    def __init__(self, root: Path, run: RunSettings, dim: int, *, part_rows: int = PART_ROWS) -> None:
        self.root = root
        self.run = run
        self.part_rows = part_rows
        self.known: dict[str, str] = {}  # canonical path -> sha256 of its newest row in the dataset
        self.rows: list[Row] = []
        self.next_part = 0
        self.written = 0  # rows written by this run
        self.replaced = 0  # of them, rows that supersede a stale row of the same path
        self._part_paths: dict[int, list[str]] = {}  # the paths in each finished part
        fields = [pa.field("path", pa.string()), pa.field("path_bytes", pa.binary()), pa.field("sha256", pa.string()),
                  pa.field("embedding", pa.list_(pa.float32(), dim))]
        if run.variance:
            fields.append(pa.field("variance", pa.list_(pa.float32(), dim)))
        if run.dispersion:
            fields.append(pa.field("dispersion", pa.float64()))
        self.schema = pa.schema(fields)

    def open(self, *, overwrite: bool) -> None:
        """Start over (`overwrite`), or resume: same settings and columns, else UsageError (exit 2)."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise UsageError(f"{root} exists and is not a dataset directory")
        parts = self._parts() if root.is_dir() else []
        if overwrite and root.is_dir():
            shutil.rmtree(root)
            parts = []
        root.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(root):
            if _TEMP.fullmatch(name):  # a part a killed run did not finish: its rows are redone
                (root / name).unlink()
        for path in parts:
            self._resume_from(path)
        self.next_part = max((_part_number(path) for path in parts), default=-1) + 1
        self._remove_superseded()  # left by a run killed between writing a new row and removing the old one

    def _parts(self) -> list[Path]:
        """The finished parts; anything else in the folder means it is not ours to resume or delete."""
        parts = []
        for name in sorted(os.listdir(self.root)):
            if _PART.fullmatch(name):
                parts.append(self.root / name)
            elif not _TEMP.fullmatch(name):
                raise UsageError(f"{self.root} holds {name!r}, which no `metta embed` run wrote; "
                                 "choose another --out")
        return parts

    def _resume_from(self, path: Path) -> None:
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as exc:
            raise UsageError(f"{path} is not a readable Parquet part ({exc}); use --overwrite to start over") from None
        found = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items() if k.startswith(b"metta.")}
        found.pop("metta.created", None)
        wanted = self.run.metadata()
        if found != wanted or not schema.remove_metadata().equals(self.schema):
            raise UsageError(_mismatch(self.root, found, wanted))
        try:
            table = pq.read_table(path, columns=["path_bytes", "sha256"])
        except (OSError, pa.ArrowException) as exc:
            raise UsageError(f"{path} is not a readable Parquet part ({exc}); use --overwrite to start over") from None
        paths = [os.fsdecode(name) for name in table.column("path_bytes").to_pylist()]
        self.known.update(zip(paths, table.column("sha256").to_pylist(), strict=True))  # parts in order: newest wins
        self._part_paths[_part_number(path)] = paths

    def add(self, row: Row) -> None:
        if self.known.get(row.path, row.sha256) != row.sha256:
            self.replaced += 1
        self.rows.append(row)
        if len(self.rows) >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as the next part: temporary name, fsync, rename."""
        # Taken from the buffer first: a Ctrl-C inside this write can then lose these rows from this run
        # (the next run redoes them), never write them twice.
        rows, self.rows = self.rows, []
        if not rows:
            return
        name = f"part-{self.next_part:05d}.parquet"
        table = pa.Table.from_arrays(self._columns(rows), schema=self.schema.with_metadata(
            {**self.run.metadata(), "metta.created": datetime.now(UTC).isoformat(timespec="seconds")}))
        self._write(name, table, f"the {len(rows)} rows of this part are redone by the next run")
        self._part_paths[self.next_part] = [row.path for row in rows]
        self.next_part += 1
        self.written += len(rows)
        self.known.update((row.path, row.sha256) for row in rows)

    def finish(self) -> None:
        """The end of a run that went well: the last part, then no path left with two rows."""
        self.flush()
        self._remove_superseded()

    def _write(self, name: str, table: pa.Table, lost: str) -> None:
        temporary = self.root / f".{name}.tmp"
        try:
            with temporary.open("wb") as file:
                pq.write_table(table, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.root / name)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise OutputError(f"could not write {self.root / name}: {exc.strerror or exc}; the {self.written} rows "
                              f"this run wrote before are kept, {lost}") from None

    def _remove_superseded(self) -> None:
        """Rewrite each part holding a row that a newer part replaced, without that row."""
        newest: dict[str, int] = {}
        for number in sorted(self._part_paths):
            newest.update(dict.fromkeys(self._part_paths[number], number))
        for number, paths in sorted(self._part_paths.items()):
            stale = {path for path in paths if newest[path] != number}
            if not stale:
                continue
            name = f"part-{number:05d}.parquet"
            table = pq.read_table(self.root / name)
            keep = [os.fsdecode(b) not in stale for b in table.column("path_bytes").to_pylist()]
            if any(keep):
                self._write(name, table.filter(pa.array(keep)), "the stale rows are removed by the next run")
            else:
                (self.root / name).unlink()
            self._part_paths[number] = [path for path in paths if path not in stale]

    def _columns(self, rows: list[Row]) -> list[pa.Array]:
        dim = self.schema.field("embedding").type.list_size
        columns: list[pa.Array] = [pa.array([display_path(r.path) for r in rows], pa.string()),
                                   pa.array([path_bytes(r.path) for r in rows], pa.binary()),
                                   pa.array([r.sha256 for r in rows], pa.string()),
                                   _vectors([r.embedding for r in rows], dim)]
        if self.run.variance:
            columns.append(_vectors([r.variance for r in rows], dim))
        if self.run.dispersion:
            columns.append(pa.array([r.dispersion for r in rows], pa.float64()))
        return columns


def _part_number(path: Path) -> int:
    match = _PART.fullmatch(path.name)
    assert match is not None
    return int(match.group(1))


def _vectors(vectors: list[np.ndarray | None], dim: int) -> pa.Array:
    flat = np.stack([v for v in vectors if v is not None]).astype(np.float32, copy=False).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)


def _mismatch(root: Path, found: dict[str, str], wanted: dict[str, str]) -> str:
    differences = [f"{key.removeprefix('metta.')}: dataset {found.get(key, '(none)')}, this run {wanted[key]}"
                   for key in wanted if found.get(key) != wanted[key]]
    detail = "; ".join(differences) or "its columns differ"
    return (f"{root} was made with other settings ({detail}); a dataset never mixes them: "
            "use the same options, another --out, or --overwrite to start over")


class ErrorLog:
    """Bad files, one JSON line each (path, type, message); rewritten by every run, which retries them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._file: IO[str] | None = None

    def add(self, path: str, kind: str, message: str) -> None:
        line = json.dumps({"path": display_path(path), "type": kind, "message": message}) + "\n"
        try:
            if self._file is None:
                self._file = self.path.open("w", encoding="utf-8")
            self._file.write(line)
            self._file.flush()  # a killed run still leaves every line it found
        except OSError as exc:
            raise OutputError(f"could not write {self.path}: {exc.strerror or exc}") from None
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # its lines were flushed one by one; a failed one was reported
                self._file.close()
        elif self.path.exists():
            self.path.unlink()  # this run found no bad file: an old list would mislead
