"""The decode pool: image decoding off the event loop, shared fairly between requests, watched for stalls.

- **Fair share**: one request decodes at most `share` images at a time (half the pool, at least one), so
  a request full of expensive files leaves the other half of the pool to everyone else.
- **Abandoned work is dropped**: a decode not yet started when its request is cancelled (client gone,
  deadline passed) never starts. One already running in a thread cannot be interrupted; the checks
  before it (`service.core.precheck`, the header size check) bound what it can cost.
- **Stalls are visible**: `stalled()` says when every worker has been busy on one image for longer than
  `stall_s`; /readyz then answers 503, so a balancer sends work elsewhere until it clears.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class DecodePool:
    def __init__(self, workers: int, *, stall_s: float = 5.0) -> None:
        self.workers = workers
        self.share = max(1, workers // 2)
        self.stall_s = stall_s
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="metta-decode")
        self._running: dict[int, float] = {}  # task id → when its decode started (monotonic)
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def request_share(self) -> asyncio.Semaphore:
        """One per request: how many of its images may be decoding at once."""
        return asyncio.Semaphore(self.share)

    async def run(self, share: asyncio.Semaphore, work: Callable[[], T]) -> T:
        """`work()` in a pool thread, within the request's share; cancelled before it starts if the caller is."""
        async with share:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, work)

    def _timed(self, work: Callable[[], T]) -> T:
        key = next(self._ids)
        with self._lock:
            self._running[key] = time.monotonic()
        try:
            return work()
        finally:
            with self._lock:
                del self._running[key]

    def stalled(self) -> bool:
        """Every worker busy on one image for longer than stall_s: new requests would wait for them."""
        cutoff = time.monotonic() - self.stall_s
        with self._lock:
            return sum(started < cutoff for started in self._running.values()) >= self.workers

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


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
