"""Decodes that can be stopped (service/core/isolation.py) and a decode pool whose backlog is visible."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from service import hostile
from service.api.decoding import DecodePool
from service.core.decode import decode_image
from service.core.errors import InvalidImage
from service.core.isolation import DecodeStopped, IsolatedDecoder, cancel_scope
from tests.unit.test_decode import LIMITS, as_hwc, encode, gradient


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def isolation() -> Iterator[IsolatedDecoder]:
    decoder = IsolatedDecoder(budget_s=0.2)
    yield decoder
    decoder.close()


def test_isolated_pixels_are_the_threads_and_errors_keep_their_type(isolation: IsolatedDecoder) -> None:
    isolation.budget_s = 30.0
    for image, fmt in ((Image.fromarray(gradient()), "PNG"), (Image.fromarray(gradient()), "TIFF"),
                       (Image.fromarray(gradient()).convert("P"), "GIF"),
                       (Image.fromarray(gradient()).convert("RGBA"), "WEBP")):
        data = encode(image, fmt)
        assert np.array_equal(as_hwc(decode_image(data, **LIMITS, isolation=isolation)),
                              as_hwc(decode_image(data, **LIMITS))), fmt
    assert len(isolation.pids()) == 1  # one child for this thread, reused
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        decode_image(encode(Image.fromarray(gradient(300, 200)), "PNG")[:400], **LIMITS, isolation=isolation)


def test_an_idle_child_holds_nothing_of_the_image_it_decoded(isolation: IsolatedDecoder) -> None:
    """After replying, a child keeps no copy of the pixels or the file: it used to hold two copies of its last
    image's pixels (240 MB after a 40 MP one) until its next request, per decode thread."""
    from service.testing import rss_bytes

    isolation.budget_s = 30.0
    decode_image(encode(Image.fromarray(gradient()), "PNG"), **LIMITS, isolation=isolation)
    [child] = isolation.pids()
    idle = rss_bytes(child)
    flat = encode(Image.new("RGB", (6_000, 4_000), (90, 120, 150)), "PNG")  # 24 MP: 72 MB of pixels
    assert tuple(decode_image(flat, **LIMITS, isolation=isolation).shape) == (3, 4_000, 6_000)
    assert isolation.pids() == [child]
    assert rss_bytes(child) - idle < 30 * 2**20


def test_a_decode_past_its_time_budget_is_killed_and_the_next_one_works(isolation: IsolatedDecoder) -> None:
    """A flat float32 TIFF of 40 MP takes ~1 s to decode; the budget is 0.2 s: its child is killed (no CPU
    spent after), 400 naming the budget, and the thread's next decode gets a fresh child."""
    slow = hostile.float_tiff(7_680, 5_200)
    decode_image(encode(Image.fromarray(gradient()), "PNG"), **LIMITS, isolation=isolation)
    [child] = isolation.pids()
    started = time.monotonic()
    with pytest.raises(DecodeStopped, match=r"image took longer than the decode time budget \(0.2 s\)"):
        decode_image(slow, **LIMITS, isolation=isolation)
    assert time.monotonic() - started < 1.5
    assert not _alive(child) and isolation.stopped == 1
    assert tuple(decode_image(encode(Image.fromarray(gradient()), "PNG"), **LIMITS, isolation=isolation).shape) == (
        3, 48, 64)


def test_a_decode_whose_caller_leaves_is_killed(isolation: IsolatedDecoder) -> None:
    isolation.budget_s = 30.0
    slow = hostile.float_tiff(7_680, 5_200)
    cancel = threading.Event()
    threading.Timer(0.1, cancel.set).start()
    started = time.monotonic()
    with cancel_scope(cancel), pytest.raises(InvalidImage, match="decode abandoned"):
        decode_image(slow, **LIMITS, isolation=isolation)
    assert time.monotonic() - started < 1.0 and isolation.pids() == []


def test_a_baseline_jpeg_decodes_in_the_thread_and_everything_else_in_the_child() -> None:
    assert not IsolatedDecoder.applies("JPEG", progressive=False)
    assert IsolatedDecoder.applies("JPEG", progressive=True)
    for fmt in ("PNG", "TIFF", "GIF", "WEBP", "BMP", "AVIF", "HEIF"):
        assert IsolatedDecoder.applies(fmt, progressive=False)


def test_the_pool_reports_its_backlog_and_forgets_what_was_cancelled() -> None:
    asyncio.run(_backlog())


async def _backlog() -> None:
    pool = DecodePool(1, stall_s=5.0)
    try:
        share = pool.request_share()
        await pool.run(share, lambda: time.sleep(0.2))  # the mean task time: 0.02 s after one (weight 0.1)
        tasks = [asyncio.ensure_future(pool.run(pool.request_share(), lambda: time.sleep(0.2))) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert pool.queued == 4 and pool.backlog_s() == pytest.approx(5 * pool.mean_s)
        for task in tasks[2:]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert pool.queued == 0 and pool.backlog_s() == 0.0
    finally:
        pool.shutdown()
