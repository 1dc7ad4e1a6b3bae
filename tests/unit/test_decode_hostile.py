"""Decode round 2: files built to be slow are refused from their bytes, the device path keeps the CPU
path's orientation, one pixel cap, float images by their range, ICC profiles converted to sRGB."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, PngImagePlugin

import service.core.decode
from service import hostile
from service.core.decode import decode_image, device_decodable, image_size
from service.core.errors import InvalidImage, PayloadTooLarge
from service.core.precheck import MAX_BMP_RLE_BYTES, MAX_JPEG_SCANS, check_structure, count_png_chunks
from tests.unit.test_decode import LIMITS, _png_header_only, as_hwc, encode, gradient


def many_scan_jpeg(width: int, height: int, scans: int) -> bytes:
    """A valid progressive JPEG followed by `scans` empty refinement scans (header only, no data)."""
    data = encode(Image.fromarray(gradient(width, height)), "JPEG", progressive=True, quality=50)
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + bytes([1, 0x00]) + bytes([1, 63, 0x10])
    return data[:-2] + sos * scans + b"\xff\xd9"


def many_chunk_png(chunks: int, kind: bytes = b"IDAT") -> bytes:
    """A small valid PNG with `chunks` empty chunks spliced in before IEND."""
    data = encode(Image.fromarray(gradient()), "PNG")
    iend = data.rindex(b"IEND") - 4
    empty = struct.pack(">I", 0) + kind + struct.pack(">I", zlib.crc32(kind))
    return data[:iend] + empty * chunks + data[iend:]


def test_a_jpeg_with_thousands_of_empty_scans_is_refused_before_decoding() -> None:
    hostile = many_scan_jpeg(600, 200, 5_000)
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match=r"images\[3\] is a JPEG with 50\d\d scans"):
        decode_image(hostile, **LIMITS, label="images[3]")
    assert time.perf_counter() - started < 0.5


def test_a_png_of_a_million_tiny_chunks_is_refused_before_decoding() -> None:
    hostile = many_chunk_png(1_000_000)  # 12 MB of chunk headers
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match="PNG with more than"):
        decode_image(hostile, **LIMITS)
    assert time.perf_counter() - started < 1.0
    with pytest.raises(InvalidImage, match="PNG with more than"):
        decode_image(many_chunk_png(100_000, b"tEXt"), **LIMITS)


def test_ordinary_progressive_jpegs_and_finely_split_pngs_pass() -> None:
    check_structure(many_scan_jpeg(64, 48, MAX_JPEG_SCANS - 20))
    decode_image(encode(Image.fromarray(gradient(300, 200)), "JPEG", progressive=True), **LIMITS)
    # libpng's habit: 8 KB IDAT chunks. Noise does not compress, so this file is ~1.2 MB in ~150 chunks.
    noise = np.random.default_rng(0).integers(0, 256, (400, 1000, 3), dtype=np.uint8)
    split = _split_idat(encode(Image.fromarray(noise), "PNG"), 8_192)
    assert count_png_chunks(split, stop_after=10**6) > 100
    assert np.array_equal(as_hwc(decode_image(split, **LIMITS)), noise.astype(np.int32))


def _split_idat(png: bytes, size: int) -> bytes:
    """The same PNG with its image data re-cut into IDAT chunks of `size` bytes."""
    offset, head, idat = 8, [png[:8]], b""
    tail: list[bytes] = []
    while offset < len(png):
        length, kind = struct.unpack_from(">I4s", png, offset)
        chunk = png[offset : offset + 12 + length]
        if kind == b"IDAT":
            idat += chunk[8:-4]
        else:
            (tail if idat else head).append(chunk)
        offset += 12 + length
    pieces = [idat[i : i + size] for i in range(0, len(idat), size)]
    chunks = [struct.pack(">I", len(p)) + b"IDAT" + p + struct.pack(">I", zlib.crc32(b"IDAT" + p)) for p in pieces]
    return b"".join(head + chunks + tail)


def _rotated_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(gradient(64, 48)), "JPEG", quality=95, exif=exif)


@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 7, 8])
def test_an_orientation_tagged_jpeg_never_takes_the_device_decoder(orientation: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's CUDA decoder ignores EXIF orientation: such files must take the Pillow path."""
    taken: list[torch.device] = []
    real = service.core.decode._decode_jpeg_on

    def recorded(data: bytes, device: torch.device) -> torch.Tensor | None:
        taken.append(device)
        return real(data, device)

    monkeypatch.setattr(service.core.decode, "_decode_jpeg_on", recorded)
    data = _rotated_jpeg(orientation)
    assert not device_decodable(Image.open(io.BytesIO(data)), icc_to_srgb=True)
    decoded = decode_image(data, **LIMITS, jpeg_device=torch.device("cpu"))
    assert taken == []
    upright = decode_image(data, **LIMITS)
    assert np.array_equal(as_hwc(decoded), as_hwc(upright))
    assert tuple(upright.shape[1:]) == ((64, 48) if orientation >= 5 else (48, 64))


def test_the_device_result_is_accepted_only_in_the_stored_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device decoder that hands back the transposed shape (as a rotation would) is not trusted."""
    data = _rotated_jpeg(1)
    monkeypatch.setattr(service.core.decode, "_decode_jpeg_on",
                        lambda data, device: torch.zeros((3, 64, 48), dtype=torch.uint8))
    decoded = decode_image(data, **LIMITS, jpeg_device=torch.device("cpu"))
    assert tuple(decoded.shape) == (3, 48, 64) and int(decoded.max()) > 0  # Pillow's pixels


def test_one_pixel_cap_above_pillows_own() -> None:
    """Pillow's 89.5 MP bomb guard no longer overrides --max-image-pixels (header-only: no pixels to decode)."""
    big = _png_header_only(10_000, 9_500)  # 95 MP
    with pytest.raises(InvalidImage, match="truncated or corrupt"):  # past the size checks, then no data
        decode_image(big, max_pixels=100_000_000, max_side=12_000)
    with pytest.raises(PayloadTooLarge, match="at most 90000000 pixels"):
        decode_image(big, max_pixels=90_000_000, max_side=12_000)
    assert Image.MAX_IMAGE_PIXELS is None


def test_float_images_in_unit_range_are_scaled_by_255() -> None:
    unit = np.linspace(0.0, 1.0, 64 * 48, dtype=np.float32).reshape(48, 64)
    decoded = as_hwc(decode_image(encode(Image.fromarray(unit, "F"), "TIFF"), **LIMITS))
    assert np.array_equal(decoded[..., 0], np.rint(unit * 255).astype(np.int32))
    wide = unit * 300.0  # beyond [0, 1]: taken on the 0-255 scale, clipped
    decoded = as_hwc(decode_image(encode(Image.fromarray(wide, "F"), "TIFF"), **LIMITS))
    assert np.array_equal(decoded[..., 0], np.clip(np.rint(wide), 0, 255).astype(np.int32))


def _adobe_rgb_photos(sample_dir: Path) -> list[Path]:
    found = []
    for path in sorted(sample_dir.glob("*.JPEG")):
        with Image.open(path) as image:
            icc = image.info.get("icc_profile")
        if icc and "Adobe RGB" in ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))):
            found.append(path)
        if len(found) == 3:
            break
    if not found:
        pytest.skip("no sample photo carries an Adobe RGB profile")
    return found


def test_adobe_rgb_photos_are_converted_to_srgb(sample_dir: Path) -> None:
    """On the sample photos (the `sample_dir` fixture skips without them, CI or not: photos are not a tool)."""
    srgb = ImageCms.createProfile("sRGB")
    for path in _adobe_rgb_photos(sample_dir):
        data = path.read_bytes()
        image = Image.open(io.BytesIO(data))
        profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        expected = ImageCms.profileToProfile(image, profile, srgb,
                                             renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC, outputMode="RGB")
        assert expected is not None
        want = np.asarray(expected, dtype=np.int32)
        assert np.array_equal(as_hwc(decode_image(data, **LIMITS)), want), path.name
        plain = as_hwc(decode_image(data, **LIMITS, icc_to_srgb=False))
        assert np.abs(plain - want).mean() > 1, path.name  # the switch really switches
        assert not device_decodable(image, icc_to_srgb=True) and device_decodable(image, icc_to_srgb=False)


def test_an_unreadable_profile_is_ignored() -> None:
    data = encode(Image.fromarray(gradient()), "PNG", icc_profile=b"not a profile at all")
    assert np.array_equal(as_hwc(decode_image(data, **LIMITS)), gradient().astype(np.int32))


# Round 3: every allowed format's amplifiers are refused from the bytes, or decoded at a bounded cost.

def test_a_bmp_rle8_bomb_decodes_in_time_that_follows_its_bytes() -> None:
    """8 KB of 'one pixel, end of line' rows: Pillow's Python decoder padded them pixel by pixel (≈ 2 s)."""
    bomb = hostile.bmp_rle8_bomb(12_000, 1_800)
    started = time.perf_counter()
    decoded = decode_image(bomb, **LIMITS)
    assert time.perf_counter() - started < 1.0
    assert tuple(decoded.shape) == (3, 1_800, 12_000)
    assert int(decoded[:, :, 0].min()) == 0x80 and int(decoded[:, :, 1:].max()) == 0  # one pixel a row, then padding


def test_a_small_rle_bmp_decodes_to_its_pixels() -> None:
    indices = (hostile.gradient(301, 203)[..., 0] // 16 * 16).astype(np.uint8)
    decoded = as_hwc(decode_image(hostile.bmp_rle8(indices), **LIMITS))
    assert np.array_equal(decoded, np.repeat(indices[..., None], 3, axis=2).astype(np.int32))


def test_a_bmp_with_too_much_run_length_data_is_refused() -> None:
    commands = b"\x00\x02\x00\x00" * (MAX_BMP_RLE_BYTES // 4 + 1)  # deltas of nothing: cost without pixels
    bomb = hostile.bmp_rle8_bomb(64, 1)
    bomb = bomb[:-2] + commands + b"\x00\x01"
    with pytest.raises(InvalidImage, match=r"RLE8-compressed BMP with \d+ bytes of run-length data"):
        decode_image(bomb, **LIMITS)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: hostile.png_many_profiles(1_329), "PNG with 1329 ICC profiles"),
    (lambda: hostile.png_many_compressed_texts(200), "more than 64 compressed text chunks"),
    (lambda: hostile.gif_many_comments(2_000_000), "GIF with more than 256 extension blocks"),
    (lambda: hostile.tiff_many_strips(4_000_000), "TIFF whose tag 273 holds 4000000 values"),
    (lambda: hostile.tiff_many_strips(200_000), "TIFF listing 200000 strips or tiles where its size implies at most 1"),
])
def test_amplifiers_of_each_format_are_refused_before_pillow_opens_them(make: Callable[[], bytes], message: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    hostile_file = make()
    opened: list[object] = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a))
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match=message):
        decode_image(hostile_file, **LIMITS)
    with pytest.raises(InvalidImage, match=message):
        image_size(hostile_file, **LIMITS)
    assert opened == [] and time.perf_counter() - started < 1.0


def test_a_tiff_of_complex_samples_is_refused() -> None:
    data = bytearray(encode(Image.fromarray(gradient()[..., 0]), "TIFF"))
    order = "<"
    ifd = struct.unpack_from(order + "I", data, 4)[0]
    count = struct.unpack_from(order + "H", data, ifd)[0]
    entry = ifd + 2 + 12 * count  # replace the directory's last entry by SampleFormat = 6 (complex float)
    data[entry - 12:entry] = struct.pack(order + "HHIH2x", 339, 3, 1, 6)
    with pytest.raises(InvalidImage, match="TIFF of sample format 6"):
        decode_image(bytes(data), **LIMITS)


def test_an_animated_png_of_2000_frames_is_counted_in_frames_and_served() -> None:
    data = hostile.apng(2_000)
    assert len(data) < 1_000_000
    assert np.array_equal(as_hwc(decode_image(data, **LIMITS)), hostile.gradient().astype(np.int32))


def test_legitimate_files_of_the_checked_kinds_pass() -> None:
    tiled = encode(Image.fromarray(gradient(300, 200)), "TIFF", tile=(16, 16))
    assert np.abs(as_hwc(decode_image(tiled, **LIMITS)) - gradient(300, 200)).max() == 0
    one_row_strips = encode(Image.fromarray(gradient(300, 200)), "TIFF", strip_size=300 * 3)
    assert np.abs(as_hwc(decode_image(one_row_strips, **LIMITS)) - gradient(300, 200)).max() == 0
    commented = encode(Image.fromarray(gradient()).convert("P"), "GIF", comment=b"made by a camera")
    decode_image(commented, **LIMITS)
    with_text = encode(Image.fromarray(gradient()), "PNG", pnginfo=_text_chunks(10))
    decode_image(with_text, **LIMITS)


def _text_chunks(count: int) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for i in range(count):
        info.add_text(f"key{i}", "some words " * 100, zip=True)
    return info


# One colour rule for every mode (service/core/colour.py).

def _centred_cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_an_icc_profile_is_applied_to_every_mode() -> None:
    """RGB, opaque RGBA, RGBA with holes, P and P with transparency carrying the same profile decode to what
    ImageCms makes of the RGB picture (on main the profile was ignored for all but RGB)."""
    profile = hostile.swapped_red_green_profile()
    picture = Image.fromarray(gradient(64, 48)).quantize(64).convert("RGB")  # exactly representable as P
    transform = ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                                        ImageCms.createProfile("sRGB"), "RGB", "RGB",
                                        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
    want = np.asarray(ImageCms.applyTransform(picture, transform), dtype=np.int32)
    assert np.abs(want - np.asarray(picture, dtype=np.int32)).mean() > 20  # the profile really changes colours
    holes = np.asarray(picture.convert("RGBA")).copy()
    holes[:8, :8, 3] = 0  # transparent corner: white whatever its colour
    want_holes = want.copy()
    want_holes[:8, :8] = 255
    variants = {
        "RGB": (picture, want), "RGBA": (picture.convert("RGBA"), want),
        "RGBA holes": (Image.fromarray(holes), want_holes),
        "P": (picture.quantize(64), want),
    }
    for name, (image, expected) in variants.items():
        for fmt in ("PNG", "WEBP") if image.mode == "RGBA" else ("PNG",):
            params = {"lossless": True} if fmt == "WEBP" else {}
            decoded = as_hwc(decode_image(encode(image, fmt, icc_profile=profile, **params), **LIMITS))
            assert np.abs(decoded - expected).max() <= 1, (name, fmt)
            assert _centred_cosine(decoded, expected) >= 0.999, (name, fmt)


def test_an_srgb_profile_is_left_as_it_is_and_other_rgb_profiles_are_converted() -> None:
    """Every 4th level of each channel, tagged with an sRGB profile of the kind cameras embed: the pixels as if it
    were absent (lcms rounded a few hundred of these colours by one level, at 2.5 ms a sample photo); tagged
    Display P3, still converted."""
    from bench.photo_set import display_p3_profile, srgb_profile

    levels = np.arange(0, 256, 4, dtype=np.uint8)
    colours = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1)
    picture = Image.fromarray(colours.reshape(512, 512, 3))
    plain = as_hwc(decode_image(encode(picture, "PNG"), **LIMITS))
    assert np.array_equal(as_hwc(decode_image(encode(picture, "PNG", icc_profile=srgb_profile()), **LIMITS)), plain)
    p3 = as_hwc(decode_image(encode(picture, "PNG", icc_profile=display_p3_profile()), **LIMITS))
    assert np.abs(p3 - plain).max() > 20


def test_the_sample_photos_sRGB_profiles_are_skipped_without_changing_a_pixel(sample_dir: Path) -> None:
    """Real cameras' and editors' sRGB profiles (about a fifth of the sample photos) are recognised as sRGB, and
    applying them would have changed no pixel of those photos; their Adobe RGB and camera profiles still apply."""
    from service.core import colour

    skipped = applied = 0
    for path in sorted(sample_dir.glob("*.JPEG")):
        with Image.open(path) as image:
            icc = image.info.get("icc_profile")
            if not icc or image.mode != "RGB":
                continue
            if colour._build_transform(icc, "RGB") is not None:
                applied += 1
                continue
            skipped += 1
            image.load()
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            transform = ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), "RGB", "RGB",
                                                renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
            converted = ImageCms.applyTransform(image, transform)
            assert np.array_equal(np.asarray(converted), np.asarray(image)), path.name
    assert skipped >= 50 and applied >= 10, (skipped, applied)


def test_transparency_is_composited_over_white_the_same_way_for_every_mode() -> None:
    """The same grey picture with the same transparent pixels, as L + tRNS key, RGB + tRNS key, P + tRNS, LA,
    RGBA and 16-bit grey + tRNS key: the same decoded pixels (on main the keys of L, RGB and I;16 were ignored)."""
    grey = (gradient(64, 48)[..., 0] // 2 + 1).astype(np.uint8)  # 1..128: no pixel is white, none is 0
    grey[10:20, 10:30] = 0  # the key colour: transparent
    hidden = grey == 0
    want = np.where(hidden, 255, grey)
    want_rgb = np.repeat(want[..., None], 3, axis=2).astype(np.int32)
    alpha = np.where(hidden, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    wide = grey.astype(np.uint16) * 257
    files = {
        "L tRNS": encode(Image.fromarray(grey, "L"), "PNG", transparency=0),
        "RGB tRNS": encode(Image.fromarray(rgb), "PNG", transparency=(0, 0, 0)),
        "P tRNS": encode(Image.fromarray(grey, "L").convert("P"), "PNG", transparency=0),
        "LA": encode(Image.fromarray(np.stack([grey, alpha], axis=-1), "LA"), "PNG"),
        "RGBA": encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"),
        "I;16 tRNS": encode(Image.fromarray(wide), "PNG", transparency=0),
    }
    for name, data in files.items():
        decoded = as_hwc(decode_image(data, **LIMITS))
        assert np.array_equal(decoded, want_rgb), name
        assert _centred_cosine(decoded, want_rgb) >= 0.999, name


def test_wide_modes_are_converted_without_full_size_float64_copies() -> None:
    """A 10 MP float32 TIFF: numpy's allocations during the decode stay under 7 bytes a pixel, most of it the
    RGB result every mode makes (on main the float64 copies and masks added ≈ 26 more); 16-bit, 32-bit and
    float pictures decode to the 8-bit one."""
    import tracemalloc

    grey = np.tile(gradient(500, 400)[..., 0], (5, 5))  # 2000 × 2500
    files = {"I;16": encode(Image.fromarray(grey.astype(np.uint16) * 257), "TIFF"),
             "I": encode(Image.fromarray(grey.astype(np.int32) * 257, "I"), "TIFF"),
             "F": encode(Image.fromarray(grey.astype(np.float32) / 255, "F"), "TIFF")}
    want = np.repeat(grey[..., None], 3, axis=2).astype(np.int32)
    for name, data in files.items():
        assert np.array_equal(as_hwc(decode_image(data, **LIMITS)), want), name
    big = hostile.float_tiff(4_000, 2_500)
    tracemalloc.start()
    try:
        decode_image(big, **LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the grey plane (1 B a pixel), the RGB result's bytes and its copy into the tensor (3 + 3), one block
    assert peak < 7 * 4_000 * 2_500 + 8 * 2**20


def test_the_icc_transform_cache_holds_a_bounded_number_of_bytes() -> None:
    """Distinct 5 MB profiles, one after another: the transforms kept hold at most ICC_CACHE_BYTES of them
    (on main an lru_cache of 64 kept every profile whole: 60 MB here, 1 GB with 15 MB profiles)."""
    import gc
    import tracemalloc

    from service.core import colour

    colour._TRANSFORMS.clear()
    files = [hostile.jpeg_with_profile(hostile.padded_profile(5 * 2**20, seed)) for seed in range(12)]
    gc.collect()
    tracemalloc.start()
    try:
        for data in files:
            decode_image(data, **LIMITS)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held <= colour.ICC_CACHE_BYTES + 2**20
    assert colour._TRANSFORMS.held <= colour.ICC_CACHE_BYTES


def test_the_pixel_budget_charges_the_bytes_of_each_decode_path() -> None:
    from service.core.colour import budget_pixels, decode_bytes_per_pixel
    from service.core.decode import open_image

    rgba = encode(Image.fromarray(gradient(300, 200)).convert("RGBA"), "PNG")
    assert open_image(rgba, **LIMITS).decoded_pixels() == budget_pixels(300, 200, "RGBA") > 300 * 200
    assert open_image(encode(Image.fromarray(gradient(300, 200)), "JPEG"), **LIMITS).decoded_pixels() == 300 * 200
    assert decode_bytes_per_pixel("some future mode") == max(decode_bytes_per_pixel(m) for m in ("RGB", "RGBA", "F"))


def test_a_jpeg_whose_icc_profile_holds_scan_markers_is_not_refused_for_them() -> None:
    """The scan count skips the segments before the first scan: a large ICC profile holds FF DA by chance."""
    profile = b"\xff\xda\x00\x01" * (MAX_JPEG_SCANS + 50)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 90)).save(buffer, "JPEG", icc_profile=profile)
    check_structure(buffer.getvalue())
    with pytest.raises(InvalidImage, match="scans"):
        check_structure(many_scan_jpeg(64, 48, MAX_JPEG_SCANS + 20))
