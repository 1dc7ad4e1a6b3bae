"""Counts of a bulk run, a progress bar on a terminal, and the one summary line every run prints."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, *, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.embedded = 0
        self.already = 0
        self.bad = 0
        self.started = time.perf_counter()
        # Only a person watching a terminal wants a bar; in a log file it is noise.
        self._bar = tqdm(total=total, unit="img", file=self.stream, dynamic_ncols=True, smoothing=0.1,
                         disable=not self.stream.isatty())

    def count_from(self, wall_time: float) -> None:
        """Start the summary's window at `wall_time` (a `time.time()`) when that is later than its start."""
        self.started = max(self.started, time.perf_counter() - (time.time() - wall_time))

    def add_embedded(self, count: int = 1) -> None:
        self.embedded += count
        self._bar.update(count)

    def add_already(self) -> None:
        self.already += 1
        self._bar.update(1)

    def add_bad(self) -> None:
        self.bad += 1
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()

    def summary(self, out: str, errors: str, *, written: int, replaced: int = 0, retried: int = 0,
                interrupted: bool = False) -> str:
        """`written`: the rows this run wrote to the output (not those computed and lost to a failed write);
        `interrupted`: Ctrl-C ended the run, so the counts are partial and the same command resumes it."""
        seconds = time.perf_counter() - self.started
        rate = written / seconds if seconds > 0 else 0.0
        bad = f"{self.bad} skipped as bad" + (f" (listed in {errors})" if self.bad else "")
        stale = f" ({replaced} replacing the stale row of a changed file)" if replaced else ""
        retries = f", {retried} requests retried" if retried else ""
        cut_short, resume = ("interrupted (Ctrl-C) after ", "; the same command again resumes") if interrupted \
            else ("", "")
        return (f"metta embed: {cut_short}{written} embedded{stale}, {self.already} already present, {bad}{retries}; "
                f"{seconds:.1f} s ({rate:.1f} images/s) -> {out}{resume}")
