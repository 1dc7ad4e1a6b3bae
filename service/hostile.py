"""Files built to cost a decoder far more than their size suggests, and legitimate files of the same
unusual kinds: what the bad-input tests, the fuzz corpus and the attack benchmark (`bench/hostile.py`)
share. Each builder returns the encoded bytes; numpy and Pillow are imported only when one is called.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any


def _encode(image: Any, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _bmp(width: int, height: int, compression: int, palette: bytes, pixels: bytes) -> bytes:
    """An 8-bit (or 4-bit for RLE4) palette BMP with a BITMAPINFOHEADER around `pixels` as stored."""
    bits = 4 if compression == 2 else 8
    colours = len(palette) // 4
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(pixels), 2835, 2835, colours, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def bmp_rle8_bomb(width: int = 12_000, height: int = 1_800) -> bytes:
    """RLE8 BMP whose every row is 'one pixel, end of line': 4 bytes a row, and Pillow's Python decoder pads
    the rest of the row one pixel at a time (seconds for 21.6 M pixels)."""
    palette = b"".join(struct.pack("<BBBB", i, i, i, 0) for i in range(256))
    rows = b"\x01\x80\x00\x00" * height + b"\x00\x01"
    return _bmp(width, height, 1, palette, rows)


def bmp_rle8(pixels: Any) -> bytes:
    """A legitimate RLE8 BMP of an (H, W) uint8 array of palette indices on a grey palette (runs and literal
    runs, as Windows' encoder writes them)."""
    height, width = pixels.shape
    palette = b"".join(struct.pack("<BBBB", i, i, i, 0) for i in range(256))
    out = bytearray()
    for row in pixels[::-1]:  # bottom-up
        x = 0
        while x < width:
            run = 1
            while x + run < width and run < 255 and row[x + run] == row[x]:
                run += 1
            if run >= 3 or width - x < 3:
                out += bytes([run, int(row[x])])
                x += run
                continue
            literal = min(255, width - x)
            literal = max(3, literal)
            out += bytes([0, literal]) + bytes(int(v) for v in row[x:x + literal])
            if literal % 2:
                out += b"\x00"  # literal runs are padded to a word
            x += literal
        out += b"\x00\x00"
    out += b"\x00\x01"
    return _bmp(width, height, 1, palette, bytes(out))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _splice_png(png: bytes, chunks: bytes) -> bytes:
    """`chunks` inserted before the first IDAT (where Pillow reads them in `Image.open`)."""
    at = png.index(b"IDAT") - 4
    return png[:at] + chunks + png[at:]


def png_many_profiles(count: int = 1_329, profile_bytes: int = 1_000_000) -> bytes:
    """A 64×64 PNG with `count` iCCP chunks, each a zlib bomb of `profile_bytes` zeros (about 1 KB stored)."""
    from PIL import Image

    body = b"icc\x00\x00" + zlib.compress(b"\x00" * profile_bytes, 9)
    return _splice_png(_encode(Image.new("RGB", (64, 64), (120, 80, 40)), "PNG"), _png_chunk(b"iCCP", body) * count)


def png_many_compressed_texts(count: int = 2_000, text_bytes: int = 1_000_000) -> bytes:
    """A 64×64 PNG with `count` zTXt chunks, each inflating to `text_bytes`."""
    from PIL import Image

    body = b"k\x00\x00" + zlib.compress(b"a" * text_bytes, 9)
    return _splice_png(_encode(Image.new("RGB", (64, 64), (120, 80, 40)), "PNG"), _png_chunk(b"zTXt", body) * count)


def apng(frames: int = 2_000, size: tuple[int, int] = (64, 48)) -> bytes:
    """A legitimate animated PNG of `frames` small frames, the first a gradient and the others it scrolled
    sideways (Pillow writes one fcTL and one fdAT per frame, about 150 bytes a frame)."""
    import numpy as np
    from PIL import Image

    first = gradient(*size)
    sequence = [Image.fromarray(np.roll(first, i + 1, axis=1)) for i in range(frames - 1)]
    return _encode(Image.fromarray(first), "PNG", save_all=True, append_images=sequence, default_image=False)


def gif_many_comments(count: int = 2_000_000) -> bytes:
    """A small GIF with `count` empty comment extensions before its image (3 bytes each)."""
    from PIL import Image

    gif = _encode(Image.new("P", (16, 16), 3), "GIF")
    at = gif.index(b"\x2c")  # the first image descriptor (after header, screen, colour table, no extension)
    return gif[:at] + b"\x21\xfe\x00" * count + gif[at:]


def tiff_many_strips(strips: int = 4_000_000, width: int = 8, height: int = 2) -> bytes:
    """A little-endian TIFF of width×height grey pixels whose StripOffsets and StripByteCounts list `strips`
    SHORT entries each (all pointing at the same pixels): 4 bytes a strip."""
    pixels = bytes(range(width * height))
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 3, strips, None), (277, 3, 1, 1), (278, 4, 1, height), (279, 3, strips, None)]
    ifd_at = 8
    ifd_size = 2 + 12 * len(tags) + 4
    pixels_at = ifd_at + ifd_size
    offsets_at = pixels_at + len(pixels)
    counts_at = offsets_at + 2 * strips
    entries = b""
    for tag, kind, count, value in tags:
        if tag == 273:
            value = offsets_at
        elif tag == 279:
            value = counts_at
        assert value is not None
        packed = struct.pack("<I", value) if tag in (273, 279) or kind == 4 else struct.pack("<H", value) + b"\x00\x00"
        entries += struct.pack("<HHI", tag, kind, count) + packed
    ifd = struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0)
    offsets = struct.pack("<H", pixels_at) * strips
    counts = struct.pack("<H", len(pixels)) * strips
    return b"II*\x00" + struct.pack("<I", ifd_at) + ifd + pixels + offsets + counts


def float_tiff(width: int = 7_680, height: int = 5_200, value: float = 0.5) -> bytes:
    """A flat float32 ('F') TIFF, deflate-compressed: about 250 KB for 40 M pixels at the default size."""
    import numpy as np
    from PIL import Image

    return _encode(Image.fromarray(np.full((height, width), value, dtype=np.float32), "F"), "TIFF",
                   compression="tiff_adobe_deflate")


def padded_profile(extra_bytes: int, seed: int = 0) -> bytes:
    """A valid sRGB ICC profile grown by `extra_bytes` of seeded noise after its tags (lcms reads it as the
    sRGB profile; distinct seeds make distinct profiles)."""
    import numpy as np
    from PIL import ImageCms

    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile += np.random.default_rng(seed).integers(0, 256, extra_bytes, dtype=np.uint8).tobytes()
    profile[0:4] = struct.pack(">I", len(profile))
    return bytes(profile)


def jpeg_with_profile(profile: bytes, size: tuple[int, int] = (64, 48)) -> bytes:
    from PIL import Image

    return _encode(Image.fromarray(gradient(*size)), "JPEG", quality=95, icc_profile=profile)


def gradient(width: int = 64, height: int = 48) -> Any:
    """A smooth RGB test picture (lossy formats keep it close)."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                     (x + y) * 255 // max(1, width + height - 2)], axis=-1).astype(np.uint8)


def swapped_red_green_profile() -> bytes:
    """An RGB ICC profile that is sRGB with its red and green primaries (and curves) swapped: a profile no
    decoder can ignore without the colours showing it."""
    from PIL import ImageCms

    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack_from(">I", profile, 128)[0]
    entries = {bytes(profile[132 + 12 * i:136 + 12 * i]): 132 + 12 * i for i in range(count)}
    for first, second in ((b"rXYZ", b"gXYZ"), (b"rTRC", b"gTRC")):
        a, b = entries[first], entries[second]
        profile[a + 4:a + 12], profile[b + 4:b + 12] = profile[b + 4:b + 12], profile[a + 4:a + 12]
    return bytes(profile)
