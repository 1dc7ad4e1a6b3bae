"""One run per output at a time: an exclusive lock on `OUT.lock`, beside the dataset.

Two runs writing one dataset would each believe their own counts while sharing part numbers; the second
is refused before it touches anything. The lock is the kernel's (`flock`), so it ends with its process,
however that ends: a killed run never leaves a stale lock, and the file itself is left in place (removing
it while another process waits on it would let two runs in). Any runner that writes a dataset (local,
--server, a cluster driver) takes it around the whole run.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.bulk.files import UsageError


class OutputBusy(UsageError):
    """Another run holds the output's lock: exit code 2, nothing written."""


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


@contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold `OUT.lock` for the body; OutputBusy at once (no waiting) when another process holds it."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise OutputBusy(f"{out} is being written by another metta embed run (pid {holder}, lock {path}); "
                             "wait for it to end, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
