"""A bulk run against a running metta-serve (`--server URL`), through `service.client.AsyncClient`.

Files are read and hashed a few at a time in threads, packed into requests that fit the server's
limits, and `concurrency` requests are kept in flight; the client retries 429/503/504 and, asked to skip
bad images, retries a request refused for one bad image (400/413/415) image by image, so only the bad
ones are logged and skipped. Rows reach the dataset on the event loop's thread only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import httpx

from service.bulk.dataset import Dataset, ErrorLog, Row
from service.bulk.files import InputFile, UsageError, display_path
from service.bulk.progress import Progress
from service.bulk.sources import read_source
from service.client import AsyncClient, MettaError, request_capacity, upload_size

_USAGE_REFUSALS = (401, 403, 422)  # the command's fault (key, options): stop, exit 2


class RemoteFailed(Exception):
    """The server kept failing (after retries): stop, exit 1."""


async def run_remote(files: list[str], dataset: Dataset, errors: ErrorLog, progress: Progress, *,
                     client: AsyncClient, concurrency: int, readers: int,
                     images_per_request: int | None = None) -> None:
    """Embed `files` through the server with the dataset's settings (`dataset.run`)."""
    known = dict(dataset.known)  # a snapshot: the reading threads use it while the dataset grows
    options = dataset.run
    limits = await client.limits()
    per_request, budget = request_capacity(options.samples, limits, images_per_request)
    batches: asyncio.Queue[list[InputFile] | None] = asyncio.Queue(maxsize=2)

    async def produce() -> None:
        batch: list[InputFile] = []
        used = 0
        with ThreadPoolExecutor(readers, thread_name_prefix="metta-embed-read") as pool:
            async for item in _read_ahead(pool, files, known, limits.max_body_bytes, ahead=4 * readers):
                if item.error is not None:
                    errors.add(item.path, *item.error)
                    progress.add_bad()
                    continue
                if item.data is None:
                    progress.add_already()
                    continue
                size = upload_size(item.data)
                if batch and (len(batch) >= per_request or used + size > budget):
                    await batches.put(batch)
                    batch, used = [], 0
                batch.append(item)
                used += size
        if batch:
            await batches.put(batch)
        for _ in range(concurrency):
            await batches.put(None)

    async def send(batch: list[InputFile]) -> None:
        try:  # a request refused for one bad image is retried image by image: only the bad ones are skipped
            reply = await client.embed([item.data or b"" for item in batch], samples=options.samples,
                                       policy=options.policy, seed=options.seed, return_variance=options.variance,
                                       return_dispersion=options.dispersion, normalize=options.normalize,
                                       on_error="skip")
        except httpx.HTTPError as exc:  # the connection kept failing through every retry
            raise RemoteFailed(f"the server could not be reached: {exc}") from None
        except MettaError as exc:
            if exc.status in _USAGE_REFUSALS:
                raise UsageError(f"the server refused the request: {exc}") from None
            raise RemoteFailed(f"the server failed: {exc}") from None
        for index, error in reply.errors.items():
            item = batch[index]
            errors.add(item.path, error.type, error.message.replace("images[0]", display_path(item.path)))
            progress.add_bad()
        if len(reply.indices) and reply.model_fingerprint != dataset.run.model_fingerprint:
            raise UsageError(f"the server's model changed during the run ({dataset.run.model_fingerprint} -> "
                             f"{reply.model_fingerprint}); run again to resume against the new one")
        for row, index in enumerate(reply.indices):
            item = batch[index]
            variance = reply.variances[row] if reply.variances is not None else None
            dispersion = float(reply.dispersions[row]) if reply.dispersions is not None else None
            dataset.add(Row(item.path, item.sha256, reply.embeddings[row], variance, dispersion))
        progress.add_embedded(len(reply.indices))

    async def sender() -> None:
        while (batch := await batches.get()) is not None:
            await send(batch)

    tasks = [asyncio.ensure_future(produce()), *(asyncio.ensure_future(sender()) for _ in range(concurrency))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def _read_ahead(pool: ThreadPoolExecutor, files: list[str], known: Mapping[str, str], max_bytes: int, *,
                      ahead: int) -> AsyncIterator[InputFile]:
    """read_source for every file on the pool, in order, with at most `ahead` reads in flight."""
    loop = asyncio.get_running_loop()
    window: deque[asyncio.Future[InputFile]] = deque()
    for path in files:
        window.append(loop.run_in_executor(pool, read_source, path, known, max_bytes))
        if len(window) >= ahead:
            yield await window.popleft()
    while window:
        yield await window.popleft()
