"""Decoding at the door: odd but valid images convert correctly; bad bytes get the right typed error."""

from __future__ import annotations

import contextlib
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.core.decode import SizeLimits, decode_image
from service.core.errors import InvalidImage, PayloadTooLarge

LIMITS: SizeLimits = {"max_pixels": 40_000_000, "max_side": 12_000}


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def gradient(width: int = 64, height: int = 48) -> np.ndarray:
    """A smooth RGB test picture (lossy formats keep it close)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)],
                    axis=-1).astype(np.uint8)


def as_hwc(tensor: torch.Tensor) -> np.ndarray:
    assert tensor.dtype == torch.uint8 and tensor.ndim == 3 and tensor.shape[0] == 3
    return tensor.permute(1, 2, 0).numpy().astype(np.int32)


def test_rgb_png_is_exact() -> None:
    pixels = gradient()
    assert np.array_equal(as_hwc(decode_image(encode(Image.fromarray(pixels), "PNG"), **LIMITS)), pixels)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "TIFF"])
def test_other_allowed_formats(fmt: str) -> None:
    pixels = gradient()
    decoded = as_hwc(decode_image(encode(Image.fromarray(pixels), fmt), **LIMITS))
    assert np.abs(decoded - pixels).mean() < 3


def test_grayscale_becomes_three_equal_channels() -> None:
    grey = gradient()[..., 0]
    decoded = as_hwc(decode_image(encode(Image.fromarray(grey, "L"), "PNG"), **LIMITS))
    assert np.array_equal(decoded, np.repeat(grey[..., None], 3, axis=2))


def test_sixteen_bit_png_is_scaled_not_clipped_to_white() -> None:
    values = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    decoded = as_hwc(decode_image(encode(Image.fromarray(values), "PNG"), **LIMITS))
    reference = np.rint(values / 257.0)
    assert np.abs(decoded[..., 0] - reference).max() <= 1
    assert decoded.mean() < 200  # naive conversion gives almost all 255


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode: str) -> None:
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., :3] = 40
    rgba[:, :5, 3] = 0  # left half transparent → white
    rgba[:, 5:, 3] = 255  # right half opaque → the colour
    image = Image.fromarray(rgba, "RGBA").convert(mode)
    decoded = as_hwc(decode_image(encode(image, "PNG"), **LIMITS))
    assert (decoded[:, :5] == 255).all()
    assert (decoded[:, 5:] == 40).all()


def test_palette_with_transparency() -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.info["transparency"] = 0
    image.paste(0, (0, 0, 4, 8))  # left half: the transparent index
    decoded = as_hwc(decode_image(encode(image, "PNG", transparency=0), **LIMITS))
    assert (decoded[:, :4] == 255).all()
    assert (decoded[:, 4:] == [200, 10, 10]).all()


def test_cmyk_jpeg_matches_pillows_reference_conversion() -> None:
    cmyk = Image.fromarray(gradient()).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int32)
    decoded = as_hwc(decode_image(data, **LIMITS))
    assert np.array_equal(decoded, reference)
    assert np.abs(decoded - gradient()).mean() < 6


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    decoded = as_hwc(decode_image(buffer.getvalue(), **LIMITS))
    assert (np.abs(decoded - [255, 0, 0]) <= 2).all()


def test_exif_orientation_is_applied() -> None:
    upright = gradient(64, 48)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # as a camera would store it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    decoded = as_hwc(decode_image(encode(stored, "JPEG", quality=95, exif=exif), **LIMITS))
    assert decoded.shape == upright.shape
    assert np.abs(decoded - upright).mean() < 4


def test_one_pixel_image_is_served() -> None:
    decoded = decode_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), **LIMITS)
    assert decoded.shape == (3, 1, 1)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge size (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(
        b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        (b"", InvalidImage, "empty"),
        (b"hello, I am text", InvalidImage, "allowed format"),
        (b"<html><body>hi</body></html>", InvalidImage, "allowed format"),
        (b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>", InvalidImage, "allowed format"),
        (encode(Image.fromarray(gradient()), "JPEG")[:300], InvalidImage, "truncated or corrupt"),
        (encode(Image.fromarray(gradient()), "PNG")[:60] + b"\0" * 40, InvalidImage, "truncated or corrupt"),
        (_png_header_only(40_000, 40_000), PayloadTooLarge, "40000x40000"),
        (_png_header_only(9_000, 9_000), PayloadTooLarge, "9000x9000"),
        (encode(Image.new("RGB", (13_000, 2)), "PNG"), PayloadTooLarge, "longest side"),
    ],
)
def test_bad_bytes_get_typed_errors(data: bytes, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        decode_image(data, **LIMITS, label="images[0]")


def test_pixel_limit() -> None:
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_image(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=9_999, max_side=1_000)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2_048))
def test_arbitrary_bytes_decode_or_raise_a_typed_error(data: bytes) -> None:
    try:
        image = decode_image(data, **LIMITS)
    except (InvalidImage, PayloadTooLarge):
        return
    assert image.dtype == torch.uint8 and image.shape[0] == 3


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=2_000))
def test_corrupted_real_images_never_escape_as_other_errors(noise: bytes, offset: int) -> None:
    data = bytearray(encode(Image.fromarray(gradient()), "PNG"))
    offset = min(offset, len(data) - 1)
    data[offset : offset + len(noise)] = noise
    with contextlib.suppress(InvalidImage, PayloadTooLarge):  # anything else fails the test
        decode_image(bytes(data), **LIMITS)


def test_float_tiff_with_nan_and_infinity_gives_defined_pixels() -> None:
    values = np.full((4, 4), np.nan, np.float32)
    values[0, 0], values[1, 1], values[2, 2] = np.inf, -np.inf, 100.4
    decoded = as_hwc(decode_image(encode(Image.fromarray(values, "F"), "TIFF"), **LIMITS))
    assert decoded[0, 0, 0] == 255 and decoded[2, 2, 0] == 100
    assert (decoded[1, 1] == 0).all() and (decoded[3, 3] == 0).all()  # NaN → 0, not whatever the cast gives


def test_any_other_parser_error_is_an_invalid_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """atheris found a crafted TIFF on which Pillow raises TypeError in load(); it must be a 400, not a 500."""
    def broken(image: Image.Image) -> Image.Image:
        raise TypeError("'float' object cannot be interpreted as an integer")

    monkeypatch.setattr("service.core.decode.to_rgb", broken)
    with pytest.raises(InvalidImage, match="malformed"):
        decode_image(encode(Image.fromarray(gradient()), "TIFF"), **LIMITS)


def _jpegs() -> dict[str, bytes]:
    stored = Image.fromarray(gradient(64, 48)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "rgb": encode(Image.fromarray(gradient()), "JPEG", quality=90),
        "grey": encode(Image.fromarray(gradient()).convert("L"), "JPEG", quality=90),
        "exif_rotated": encode(stored, "JPEG", quality=95, exif=exif),
        "progressive": encode(Image.fromarray(gradient(70, 50)), "JPEG", quality=80, progressive=True),
    }


@pytest.mark.parametrize("name", ["rgb", "grey", "progressive"])
def test_device_jpeg_decode_gives_the_same_pixels(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path the service takes on CUDA (torchvision's decoder on the device), run on the CPU here."""
    import service.core.decode

    taken: list[torch.device] = []
    real = service.core.decode._decode_jpeg_on

    def recorded(data: bytes, device: torch.device) -> torch.Tensor | None:
        taken.append(device)
        return real(data, device)

    monkeypatch.setattr(service.core.decode, "_decode_jpeg_on", recorded)
    data = _jpegs()[name]
    on_device = decode_image(data, **LIMITS, jpeg_device=torch.device("cpu"))
    assert taken == [torch.device("cpu")]
    assert on_device.is_contiguous()
    assert np.array_equal(as_hwc(on_device), as_hwc(decode_image(data, **LIMITS)))


def test_device_jpeg_decode_keeps_every_check() -> None:
    cpu = torch.device("cpu")
    truncated = encode(Image.fromarray(gradient()), "JPEG")[:300]
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        decode_image(truncated, **LIMITS, jpeg_device=cpu)
    with pytest.raises(PayloadTooLarge, match="longest side"):
        decode_image(encode(Image.new("RGB", (13_000, 2)), "JPEG"), **LIMITS, jpeg_device=cpu)
    cmyk = encode(Image.fromarray(gradient()).convert("CMYK"), "JPEG", quality=95)  # Pillow's conversion
    assert np.array_equal(as_hwc(decode_image(cmyk, **LIMITS, jpeg_device=cpu)), as_hwc(decode_image(cmyk, **LIMITS)))
