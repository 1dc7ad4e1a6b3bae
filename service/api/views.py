"""The path every endpoint that computes views takes: admit → decode and plan in the pool → engine → settle.

/v1/embeddings and /v1/classify both call `run_views`, so they share its limits, deadlines and metrics, and
a client that leaves mid-way has its work dropped (decodes not started never start; queued crops are
abandoned at once) and is counted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from service.api.decoding import all_or_nothing
from service.api.protocol import REFUSED
from service.api.requests import ViewRequest
from service.api.state import ServiceState
from service.core.decode import OpenedImage, open_image
from service.core.embedding import EmbedOptions, ImageJob, ImageResult, decode_reduction
from service.core.errors import DeadlineExceeded, ServiceError
from service.engine.budget import Reservation
from service.engine.scheduler import SamplesRange
from service.metrics import Metrics

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


async def run_views(request: Request, state: ServiceState, images: list[bytes], options: EmbedOptions,
                    views: ViewRequest, endpoint: str, *, field: str = "images"
                    ) -> tuple[list[ImageJob], list[ImageResult]]:
    """Decode and plan every image, run them through the engine, and wait (dropping them if the client leaves).

    `field`: the request field the images came in, which errors about one image name.
    """
    metrics = state.metrics
    assert state.engine is not None
    auto = None if views.auto is None else SamplesRange(*views.auto)
    samples = state.engine.check_room(len(images), options.samples, views.timeout_s, auto)  # 429 before decoding
    pixels = state.pixel_budget.reserve(0)  # the request's decoded pixels, held until it settles (429 when over)
    metrics.inflight_requests.inc()
    try:
        # One deadline for the whole request: what decoding used is not given again to the queue and forward.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + views.timeout_s
        decoding = _decode_all(state, images, dataclasses.replace(options, samples=samples), pixels, field)
        jobs = await _decoded_in_time(request, state, decoding, views.timeout_s)
        left_s = deadline - loop.time()
        if left_s <= 0:
            raise DeadlineExceeded(f"decoding the images used the request's whole deadline ({views.timeout_s:g} s)")
        engine = state.engine
        pending = engine.admit(jobs, left_s, auto=auto)
        try:
            results = await _wait_unless_disconnected(request, engine.result(pending, left_s))
        except asyncio.CancelledError:  # the server cancelled it (its shutdown grace ran out): no client left
            engine.abandon(pending, "shutdown")
            raise
        except ClientGone:
            engine.abandon(pending, "client_gone")  # at once, before the worker forms its next batch
            count_client_gone(request, metrics)
            raise
    finally:
        metrics.inflight_requests.dec()
        pixels.release()
    metrics.images.inc(len(jobs))
    samples = len(jobs[0].views)  # auto S: what the scheduler gave it
    metrics.samples_used.labels(endpoint).observe(samples)
    if views.auto is not None and samples < views.auto[1]:
        metrics.samples_shrunk.labels(endpoint).inc()
    return list(jobs), results


async def _decode_all(state: ServiceState, images: list[bytes], options: EmbedOptions, pixels: Reservation,
                      field: str) -> list[ImageJob]:
    """Each image's header read (once) and the reduced decode its views allow chosen, then the pixels that decode
    will hold reserved against the pixel budget just before it decodes (429 when full), the image decoded and
    planned in the decode pool, and the hold shrunk to the working copy it keeps.

    A request holds at most its decode share of decodes at once plus its working copies: one request of many
    large images cannot take the whole budget from everyone else while it decodes (reserving every header at
    once, 64 × 40 MP held 2.4 G pixels of a 256 M budget for the 20 s of its decode).
    """
    settings, model = state.settings, state.model
    assert model is not None
    pool = state.decode_pool
    share = pool.request_share()
    # The request's decode slots, held from the header check to the working copy, so that no more than the
    # pool's share of its decodes is reserved at a time (the pool's own share is released between the two trips).
    slots = asyncio.Semaphore(pool.share)

    def opened(data: bytes, index: int) -> tuple[OpenedImage, int]:
        """The header, read once, and the reduced decode the views allow."""
        image = open_image(data, max_pixels=settings.max_image_pixels, max_side=settings.max_image_side,
                           label=f"{field}[{index}]")
        if not settings.reduced_decode or state.jpeg_device is not None:
            return image, 1
        return image, decode_reduction(image, options, model)

    def decode_and_plan(image: OpenedImage, reduction: int) -> ImageJob:
        started = time.perf_counter()
        decoded = image.decode(reduction, jpeg_device=state.jpeg_device, icc_to_srgb=settings.icc_to_srgb,
                               isolation=pool.isolation)
        state.metrics.decode_duration.observe(time.perf_counter() - started)
        return ImageJob(decoded, options, model, reduced=image.reduced_geometry(reduction))

    async def one(data: bytes, index: int) -> ImageJob:
        async with slots:
            image, reduction = await pool.run(share, functools.partial(opened, data, index))
            upper = image.decoded_pixels(reduction)  # what the decode will hold
            pixels.grow(upper)
            job = await pool.run(share, functools.partial(decode_and_plan, image, reduction))
            pixels.shrink(max(0, upper - job.pixels))  # the decoded size was the upper bound; the copy is less
            return job

    return await all_or_nothing([one(data, i) for i, data in enumerate(images)])


def count_client_gone(request: Request, metrics: Metrics) -> None:
    """A request that gets no reply because its client left: counted once, unless the HTTP protocol cut it
    short with a refusal of its own (which it counted)."""
    if not getattr(request.state, REFUSED, False):
        metrics.rejected.labels("client_gone").inc()


async def _decoded_in_time(request: Request, state: ServiceState, decoding: Awaitable[list[ImageJob]],
                           timeout_s: float) -> list[ImageJob]:
    """The decoded jobs, unless the client leaves (ClientGone) or the deadline passes first (504); either
    way the images not yet decoding never start."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _wait_unless_disconnected(request, decoding)
    except TimeoutError:
        raise DeadlineExceeded(f"the images were not decoded within the request's deadline ({timeout_s:g} s)") from None
    except ClientGone:
        count_client_gone(request, state.metrics)
        raise


async def _wait_unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await the work; if the client disconnects first, cancel it (its crops are dropped)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the handler itself was cancelled (server-side disconnect handling)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ServiceError):
        await task
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
