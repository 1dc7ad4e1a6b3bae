"""HEIC (pi-heif) and AVIF (Pillow's own) are allowed formats with the same defences as the others: size caps
from the header before decoding, EXIF orientation, ICC profiles to sRGB, the first image of a sequence, and
typed errors for broken or hostile files."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image, features

from bench.photo_set import display_p3_profile, to_display_p3
from service.bulk.files import IMAGE_EXTENSIONS
from service.core.decode import ALLOWED_FORMATS, decode_image, open_image
from service.core.errors import InvalidImage, PayloadTooLarge
from tests.unit.test_decode import LIMITS, as_hwc, gradient

if os.environ.get("CI") == "true":  # CI installs the dev lock: a missing encoder there is a failure
    import pillow_heif
else:
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif (the HEIC encoder, a dev dependency) "
                                                            "writes the test files")


def heic(image: Image.Image, **params: object) -> bytes:
    """HEIC bytes written by pillow-heif without registering its opener (decoding stays pi-heif's)."""
    out = io.BytesIO()
    pillow_heif.from_pillow(image).save(out, quality=95, **params)
    return out.getvalue()


def avif(image: Image.Image, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "AVIF", quality=95, **params)
    return out.getvalue()


def picture(width: int = 64, height: int = 48) -> Image.Image:
    return Image.fromarray(gradient(width, height))


ENCODERS = {"heic": heic, "avif": avif}


def test_the_installed_pillow_decodes_avif_and_both_formats_are_allowed() -> None:
    assert features.check("avif")
    assert {"HEIF", "AVIF"} <= set(ALLOWED_FORMATS)
    assert {".heic", ".heif", ".avif"} <= IMAGE_EXTENSIONS


@pytest.mark.parametrize("fmt", ["heic", "avif"])
def test_a_picture_decodes_close_to_its_pixels(fmt: str) -> None:
    decoded = decode_image(ENCODERS[fmt](picture()), **LIMITS)
    assert tuple(decoded.shape) == (3, 48, 64)
    assert np.abs(as_hwc(decoded) - gradient()).mean() < 3


@pytest.mark.parametrize("fmt", ["heic", "avif"])
def test_the_pixel_cap_is_checked_from_the_header_before_decoding(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = ENCODERS[fmt](picture(400, 300))
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(1))
    with pytest.raises(PayloadTooLarge, match="400x300"):
        decode_image(data, max_pixels=100_000, max_side=12_000)
    assert loads == []


@pytest.mark.parametrize("fmt", ["heic", "avif"])
def test_a_header_declaring_a_huge_picture_is_refused_before_decoding(fmt: str) -> None:
    """The `ispe` box (image spatial extents) rewritten to 60000 × 60000: refused from the header, 413."""
    data = bytearray(ENCODERS[fmt](picture()))
    at = data.find(b"ispe")
    assert at > 0
    data[at + 8 : at + 16] = (60_000).to_bytes(4, "big") * 2  # after the box type: version/flags, width, height
    with pytest.raises((PayloadTooLarge, InvalidImage)) as refused:
        decode_image(bytes(data), **LIMITS)
    assert isinstance(refused.value, PayloadTooLarge) or "decod" in refused.value.message


@pytest.mark.parametrize("fmt", ["heic", "avif"])
def test_truncated_and_corrupted_files_are_invalid_images(fmt: str) -> None:
    data = ENCODERS[fmt](picture())
    rng = np.random.default_rng(1)
    for cut in (0, 12, 40, len(data) // 3, len(data) // 2, len(data) - 8):
        with pytest.raises((InvalidImage, PayloadTooLarge)):
            decode_image(data[:cut], **LIMITS)
    for _ in range(30):  # a few flipped bytes: a picture or a typed error, nothing else
        noisy = bytearray(data)
        for index in rng.integers(0, len(data), 4):
            noisy[index] = int(rng.integers(0, 256))
        try:
            image = decode_image(bytes(noisy), **LIMITS)
        except (InvalidImage, PayloadTooLarge):
            continue
        assert image.dtype == torch.uint8 and image.shape[0] == 3


@pytest.mark.parametrize("fmt", ["heic", "avif"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned back by 90°: upright is the source picture
    upright = picture(64, 48)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    data = ENCODERS[fmt](stored, exif=exif.tobytes())
    opened = open_image(data, **LIMITS)
    assert opened.size == (64, 48)
    decoded = opened.decode()
    assert tuple(decoded.shape) == (3, 48, 64)
    assert np.abs(as_hwc(decoded) - gradient()).mean() < 3


@pytest.mark.parametrize("fmt", ["heic", "avif"])
def test_a_display_p3_profile_is_converted_to_srgb(fmt: str) -> None:
    srgb = picture()  # smooth and saturated: the profile moves it far, the lossy codec little
    profile = display_p3_profile()
    p3 = to_display_p3(srgb, profile)
    decoded = as_hwc(decode_image(ENCODERS[fmt](p3, icc_profile=profile), **LIMITS))
    ignored = as_hwc(decode_image(ENCODERS[fmt](p3, icc_profile=profile), **LIMITS, icc_to_srgb=False))
    truth = np.asarray(srgb, dtype=np.int32)
    assert np.abs(decoded - truth).mean() < 4 < np.abs(ignored - truth).mean()


@pytest.mark.parametrize("fmt", ["heic", "avif"])
def test_a_sequence_gives_its_first_image(fmt: str) -> None:
    first, second = picture(), picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if fmt == "heic":
        out = io.BytesIO()
        sequence = pillow_heif.from_pillow(first)
        sequence.add_from_pillow(second)
        sequence.save(out, quality=95)
        data = out.getvalue()
    else:
        data = avif(first, save_all=True, append_images=[second])
    assert np.abs(as_hwc(decode_image(data, **LIMITS)) - gradient()).mean() < 3
