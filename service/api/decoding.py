"""The decode pool: image decoding off the event loop, shared fairly between requests, watched for stalls.

- **Fair share**: one request decodes at most `share` images at a time (half the pool, at least one), so
  a request full of expensive files leaves the other half of the pool to everyone else.
- **Abandoned work is dropped**: a decode not yet started when its request is cancelled (client gone,
  deadline passed) never starts. One already running in its isolated child process
  (`service.core.isolation`, the pool's `isolation`) is killed then, and at the decode time budget; a
  baseline JPEG decodes in the thread (bounded by its pixels, after `service.core.precheck`).
- **Stalls and backlogs are visible**: `stalled()` says when every worker has been busy on one image for
  longer than `stall_s`; `backlog_s()` estimates how long the decodes waiting and running would keep every
  worker busy (at the mean decode time measured lately), exported as `metta_decode_backlog_seconds`.
  /readyz answers 503 when either passes `stall_s`, so a balancer sends work elsewhere until it clears.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from service.core.isolation import IsolatedDecoder, cancel_scope

T = TypeVar("T")
_MEAN_WEIGHT = 0.1  # of each new decode time in the moving mean


class _Task:
    """One task's place in the pool: whether a thread took it, whether its caller left first."""

    __slots__ = ("cancel", "dropped", "started")

    def __init__(self) -> None:
        self.started = False
        self.dropped = False
        self.cancel = threading.Event()


class DecodePool:
    def __init__(self, workers: int, *, stall_s: float = 5.0, time_budget_s: float | None = None) -> None:
        self.workers = workers
        self.share = max(1, workers // 2)
        self.stall_s = stall_s
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="metta-decode")
        self._running: dict[int, float] = {}  # task id → when its decode started (monotonic)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.queued = 0  # handed to the executor, not started yet
        self.mean_s = 0.0  # moving mean of a task's time
        # None: every decode in its thread (no time budget)
        self.isolation = IsolatedDecoder(time_budget_s, spares=workers) if time_budget_s is not None else None

    def request_share(self) -> asyncio.Semaphore:
        """One per request: how many of its images may be decoding at once."""
        return asyncio.Semaphore(self.share)

    async def run(self, share: asyncio.Semaphore, work: Callable[[], T]) -> T:
        """`work()` in a pool thread, within the request's share; cancelled before it starts if the caller is."""
        async with share:
            task = _Task()
            with self._lock:
                self.queued += 1
            future = asyncio.get_running_loop().run_in_executor(self._executor, self._timed, work, task)
            try:
                return await future
            except asyncio.CancelledError:
                with self._lock:
                    if not task.started:  # it never will: the thread checks under the same lock
                        task.dropped = True
                        self.queued -= 1
                task.cancel.set()  # a decode already running in its child process is killed
                raise

    def _timed(self, work: Callable[[], T], task: _Task) -> T:
        key = next(self._ids)
        started = time.monotonic()
        with self._lock:
            if task.dropped:
                raise asyncio.CancelledError  # its caller is gone; nobody awaits this
            task.started = True
            self.queued -= 1
            self._running[key] = started
        try:
            with cancel_scope(task.cancel):
                return work()
        finally:
            with self._lock:
                del self._running[key]
                self.mean_s += _MEAN_WEIGHT * (time.monotonic() - started - self.mean_s)

    def backlog_s(self) -> float:
        """How long the tasks waiting and running would keep every worker busy, at the mean task time."""
        with self._lock:
            return (self.queued + len(self._running)) * self.mean_s / self.workers

    def stalled(self) -> bool:
        """Every worker busy on one image for longer than stall_s: new requests would wait for them."""
        cutoff = time.monotonic() - self.stall_s
        with self._lock:
            return sum(started < cutoff for started in self._running.values()) >= self.workers

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.isolation is not None:
            self.isolation.close()


async def all_or_nothing(coroutines: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run them concurrently; on the first failure (or if cancelled) cancel the rest and raise it.

    Unlike `asyncio.gather`, a request whose third image is refused does not keep decoding the others.
    """
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
