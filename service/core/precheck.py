"""Cheap structural checks on the encoded bytes, before any decoder sees them.

Some valid-looking files cost a decoder far more than their size suggests: a progressive JPEG with
thousands of (empty) scans makes libjpeg re-walk every coefficient once per scan, and a PNG made of
millions of tiny chunks makes Pillow's Python chunk reader loop once per chunk. Both are refused here
in time linear in the bytes (and bounded by the caps), so one such file cannot hold a decode worker.

The caps are far above what encoders write: libjpeg/mozjpeg progressive files have about 10 scans;
libpng writes IDAT chunks of 8 KB or more.
"""

from __future__ import annotations

import struct

from service.core.errors import InvalidImage

MAX_JPEG_SCANS = 100
# A PNG may hold this many chunks, plus one per 4 KB of file: big files may split their data finely,
# but a file that is mostly chunk headers is not a picture.
PNG_FREE_CHUNKS = 1_024
PNG_BYTES_PER_CHUNK = 4_096

_JPEG_SOI = b"\xff\xd8"
_JPEG_SOS = b"\xff\xda"  # never inside entropy-coded data (0xFF is stuffed there), so counting is exact enough
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_structure(data: bytes, label: str = "image") -> None:
    """Raise InvalidImage naming `label` if the bytes are a JPEG or PNG built to be slow to decode."""
    if data.startswith(_JPEG_SOI):
        scans = data.count(_JPEG_SOS)
        if scans > MAX_JPEG_SCANS:
            raise InvalidImage(f"{label} is a JPEG with {scans} scans; at most {MAX_JPEG_SCANS} are accepted")
    elif data.startswith(_PNG_SIGNATURE):
        limit = png_chunk_limit(len(data))
        if count_png_chunks(data, stop_after=limit) > limit:
            raise InvalidImage(f"{label} is a PNG with more than {limit} chunks (too many for its size)")


def png_chunk_limit(size: int) -> int:
    return PNG_FREE_CHUNKS + size // PNG_BYTES_PER_CHUNK


def count_png_chunks(data: bytes, *, stop_after: int) -> int:
    """Chunks up to IEND (or the end of the bytes), counting at most stop_after + 1 of them."""
    offset, count = len(_PNG_SIGNATURE), 0
    while offset + 8 <= len(data) and count <= stop_after:
        length, kind = struct.unpack_from(">I4s", data, offset)
        count += 1
        if kind == b"IEND":
            break
        offset += 12 + length  # length, type, data, CRC
    return count
