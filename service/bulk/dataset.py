"""The output of a bulk run: a Parquet dataset directory that is valid at every moment.

Rows are buffered and written as part files of at most `part_rows` rows; each part is written under a
hidden temporary name (pyarrow's dataset discovery skips names starting with '.') and renamed once
complete, so `pyarrow.parquet.read_table(OUT)` never sees half a part, even after `kill -9`. Every part
carries the run's settings as schema metadata; a later run resumes only when they match, skipping the
(path, sha256) pairs the dataset already holds, and at most the one unfinished part is redone.
"""

from __future__ import annotations

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

from service.bulk.files import UsageError

PART_ROWS = 1_000
_PART = re.compile(r"part-(\d{5,})\.parquet")
_TEMP = re.compile(r"\.part-\d{5,}\.parquet\.tmp")


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
            "metta.options": json.dumps(
                {"normalize": self.normalize, "variance": self.variance, "dispersion": self.dispersion},
                sort_keys=True),
        }


@dataclass
class Row:
    path: str
    sha256: str
    embedding: np.ndarray  # (dim,) float32
    variance: np.ndarray | None = None
    dispersion: float | None = None


def errors_path(root: Path) -> Path:
    """Bad files are listed beside the dataset (inside it, a reader would try to open the log as a part)."""
    return root.with_name(root.name + ".errors.jsonl")


class Dataset:
    """One run's writer: open() checks or clears what is there; add() buffers; flush() writes a part."""

    def __init__(self, root: Path, run: RunSettings, dim: int, *, part_rows: int = PART_ROWS) -> None:
        self.root = root
        self.run = run
        self.part_rows = part_rows
        self.done: set[tuple[str, str]] = set()  # (path, sha256) already in the dataset
        self.rows: list[Row] = []
        self.next_part = 0
        self.written = 0  # rows written by this run
        fields = [pa.field("path", pa.string()), pa.field("sha256", pa.string()),
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
            table = pq.read_table(path, columns=["path", "sha256"])
        except (OSError, pa.ArrowException) as exc:
            raise UsageError(f"{path} is not a readable Parquet part ({exc}); use --overwrite to start over") from None
        found = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items() if k.startswith(b"metta.")}
        found.pop("metta.created", None)
        wanted = self.run.metadata()
        if found != wanted or not schema.remove_metadata().equals(self.schema):
            raise UsageError(_mismatch(self.root, found, wanted))
        self.done.update(zip(table.column("path").to_pylist(), table.column("sha256").to_pylist(), strict=True))

    def add(self, row: Row) -> None:
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
        temporary = self.root / f".{name}.tmp"
        table = pa.Table.from_arrays(self._columns(rows), schema=self.schema.with_metadata(
            {**self.run.metadata(), "metta.created": datetime.now(UTC).isoformat(timespec="seconds")}))
        with temporary.open("wb") as file:
            pq.write_table(table, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.root / name)
        self.next_part += 1
        self.written += len(rows)
        self.done.update((row.path, row.sha256) for row in rows)

    def _columns(self, rows: list[Row]) -> list[pa.Array]:
        dim = self.schema.field("embedding").type.list_size
        columns: list[pa.Array] = [pa.array([r.path for r in rows], pa.string()),
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
        if self._file is None:
            self._file = self.path.open("w", encoding="utf-8")
        self._file.write(json.dumps({"path": path, "type": kind, "message": message}) + "\n")
        self._file.flush()  # a killed run still leaves every line it found
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        elif self.path.exists():
            self.path.unlink()  # this run found no bad file: an old list would mislead
