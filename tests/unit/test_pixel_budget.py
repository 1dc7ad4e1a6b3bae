"""The pixel budget's pieces: a header-size upper bound that matches the decoder, and a reservation shrunk to it."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from service.core.decode import SizeLimits, decode_image, image_size
from service.core.errors import InvalidImage, Overloaded, PayloadTooLarge
from service.engine.budget import Budget


def encoded(width: int, height: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_the_header_size_is_the_decoded_size_and_refused_alike(fmt: str) -> None:
    data = encoded(300, 40, fmt)
    assert image_size(data, max_pixels=10**6, max_side=1000) == (300, 40)
    assert tuple(decode_image(data, max_pixels=10**6, max_side=1000).shape) == (3, 40, 300)
    too_small: list[SizeLimits] = [{"max_pixels": 11_999, "max_side": 1000}, {"max_pixels": 10**6, "max_side": 299}]
    for limits in too_small:
        with pytest.raises(PayloadTooLarge):
            image_size(data, **limits)
        with pytest.raises(PayloadTooLarge):
            decode_image(data, **limits)
    for bad in (b"", b"not an image", data[:20]):
        with pytest.raises(InvalidImage):
            decode_image(bad, max_pixels=10**6, max_side=1000)
        if len(bad) < 20:  # a truncated file may still have a whole header: only decoding finds the rest missing
            with pytest.raises(InvalidImage):
                image_size(bad, max_pixels=10**6, max_side=1000)


def test_a_reservation_shrinks_to_what_is_known_and_frees_room_for_others() -> None:
    budget = Budget(100, "decoded pixels")
    first = budget.reserve(0)
    first.grow(90)  # header sizes: an upper bound
    with pytest.raises(Overloaded) as refused:
        budget.reserve(20)
    assert refused.value.headers == {"Retry-After": "1"}
    first.shrink(80)  # decoded: the working copies hold 10
    assert (budget.held, first.amount) == (10, 10)
    second = budget.reserve(20)
    with pytest.raises(ValueError):
        first.shrink(11)
    first.release()
    second.release()
    assert budget.held == 0 and budget.peak == 90
