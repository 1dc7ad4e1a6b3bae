"""Bytes → a checked uint8 (3, H, W) RGB tensor, before anything is queued.

Only an allow-list of formats is opened; files built to be slow to decode are refused from their bytes
first (`precheck`); the size is checked from the header before any pixel is decoded; EXIF orientation is
applied; every mode becomes 8-bit sRGB by one rule (`service.core.colour`: transparency split off, wide modes
scaled, the ICC profile applied, then alpha over white).

One pixel cap: `max_pixels` (the service's --max-image-pixels). Pillow's own bomb guard
(`Image.MAX_IMAGE_PIXELS`, 89.5 MP) is switched off at import because it fires in `Image.open`, before our
check, and silently lowered any larger setting; ours runs at the same point, from the same header.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypedDict

import numpy as np
import pi_heif
from PIL import Image, UnidentifiedImageError

from service.core import bmp_rle
from service.core.colour import budget_pixels, to_rgb
from service.core.errors import InvalidImage, PayloadTooLarge
from service.core.precheck import check_structure

if TYPE_CHECKING:  # torch is imported where a tensor is made: the isolated decoder's child runs without it
    import torch


class Isolation(Protocol):
    """Where some decodes run instead of this thread (`service.core.isolation.IsolatedDecoder`)."""

    def applies(self, image_format: str | None, progressive: bool) -> bool: ...

    def decode(self, data: bytes, *, reduction: int, icc_to_srgb: bool, max_pixels: int, max_side: int,
               label: str) -> np.ndarray: ...


# Pillow format ids: JPEG, PNG, WebP, GIF (first frame), BMP, TIFF (first page), HEIF (HEIC: the primary
# image, through pi-heif, a decode-only libheif + libde265 build) and AVIF (Pillow's own libavif; the first
# frame of a sequence).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")
# Only the primary image: thumbnails, depth maps and auxiliary images are neither read nor decoded.
pi_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
_ORIENTATION = 0x0112  # the EXIF tag
Image.MAX_IMAGE_PIXELS = None  # one cap, ours (see the module docstring)
bmp_rle.install()  # run-length BMPs at a cost that follows the file, not the pixels


@dataclass(frozen=True)
class ReducedGeometry:
    """Where the pixels of a reduced decode lie on the full picture (upright): decoded pixel i of an axis covers
    source pixels [d·i, d·i + d) for the denominator d, so d, not the ratio of the sizes, maps one onto the
    other. libjpeg rounds a reduced size up, so a side that is not a multiple of d ends in a pixel that covers
    fewer source pixels (the encoder's edge padding fills the rest); after an EXIF flip or turn that pixel may
    be an axis's first instead of its last (`partial_first`, as (rows, columns))."""

    height: int
    width: int
    denominator: int
    partial_first: tuple[bool, bool] = (False, False)


class OpenedImage:
    """An image opened from its header once: format, size and orientation known, its size checked against the
    caps, no pixel decoded yet. The service plans the views from `size`, charges `decoded_pixels` of the
    reduction they allow against its pixel budget, then `decode`s it at that reduction.

    `width`, `height`: the upright size (after EXIF orientation), the size the views are planned on.
    """

    def __init__(self, image: Image.Image, data: bytes, label: str) -> None:
        self.image = image
        self.data = data
        self.label = label
        self.stored = image.size  # as the pixels are stored, before orientation
        # Pillow finds a PNG's eXIf chunk placed after the pixels only by decoding them all: a header-only
        # read ignores it (as browsers do), and the decode applies this same orientation.
        late_exif = image.format == "PNG" and "exif" not in image.info
        self.orientation = 1 if late_exif else exif_orientation(image)
        width, height = self.stored
        self.width, self.height = (height, width) if self.orientation >= 5 else (width, height)

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def reduction(self, min_scale: float) -> int:
        """The largest denominator (8, 4, 2 or 1) this file can be decoded at in the codec itself whose every side
        is still at least `min_scale` of the full one: JPEG's DCT scaling (libjpeg-turbo decodes only the low
        frequencies of each block). 1 for formats without a reduced decode."""
        if self.image.format != "JPEG":
            return 1
        return next((d for d in JPEG_REDUCTIONS if 1 / d >= min_scale), 1)

    def reduced_geometry(self, reduction: int) -> ReducedGeometry | None:
        """How `decode(reduction)`'s pixels lie on the upright picture; None for a whole decode."""
        if reduction == 1:
            return None
        rows_first, columns_first = _PARTIAL_FIRST[self.orientation]
        # Only a side that is not a multiple of the scale has a partial pixel to put last.
        partial_first = (rows_first and self.height % reduction != 0, columns_first and self.width % reduction != 0)
        return ReducedGeometry(self.height, self.width, reduction, partial_first)

    def decoded_pixels(self, reduction: int = 1) -> int:
        """What the pixel budget charges for a decode at `reduction`: the pixels it holds, weighted by the bytes
        a pixel of this mode's decode path holds (`colour.budget_pixels`)."""
        width, height = self.stored
        return budget_pixels(-(-width // reduction), -(-height // reduction), self.image.mode)

    def decode(self, reduction: int = 1, *, jpeg_device: torch.device | None = None,
               icc_to_srgb: bool = True, isolation: Isolation | None = None) -> torch.Tensor:
        """The pixels, uint8 (3, H, W) upright RGB, decoded at 1/`reduction` of the size on each side (rounded
        up, as libjpeg does); raises InvalidImage (400) naming the label.

        With `jpeg_device` (the service passes its CUDA device), JPEGs that need no pixel work beyond decoding
        (see `device_decodable`) are decoded by torchvision there (nvJPEG on CUDA) at full size and the tensor
        comes back on that device; any JPEG torchvision refuses takes the Pillow path. `icc_to_srgb`: convert
        an embedded ICC profile to sRGB (relative colorimetric); a profile lcms cannot read is ignored (the
        pixels are taken as sRGB, as browsers do). With `isolation`, the images it `applies` to are decoded in
        its child process, within its time budget (`service.core.isolation`).
        """
        import torch

        image = self.image
        if jpeg_device is not None and device_decodable(image, icc_to_srgb=icc_to_srgb):
            with _decode_errors(self.label):
                decoded = _decode_jpeg_on(self.data, jpeg_device)
            # Only the stored shape: an orientation-tagged file never gets here (see device_decodable).
            if decoded is not None and tuple(decoded.shape[1:]) == (self.stored[1], self.stored[0]):
                return decoded
        if isolation is not None and isolation.applies(image.format, bool(image.info.get("progressive"))):
            width, height = self.stored
            pixels = isolation.decode(self.data, reduction=reduction, icc_to_srgb=icc_to_srgb,
                                      max_pixels=width * height, max_side=max(width, height), label=self.label)
        else:
            pixels = self.pixels(reduction, icc_to_srgb=icc_to_srgb)
        # (3, H, W) over the decoder's H×W×3 pixels, not repacked: the renderer reads this interleaved layout
        # fastest (see `pixel_interleaved`), and one copy less per image.
        return torch.from_numpy(pixels).permute(2, 0, 1)

    def pixels(self, reduction: int = 1, *, icc_to_srgb: bool = True) -> np.ndarray:
        """`decode`'s Pillow path in this thread, as an (H, W, 3) uint8 array."""
        image, label = self.image, self.label
        with _decode_errors(label):
            if reduction > 1:
                width, height = self.stored
                image.draft(image.mode, (width // reduction, height // reduction))
            expected = image.size
            image.load()
            # keeps `info`, the ICC profile with it; only when there is something to turn (else it copies)
            upright = image.transpose(_UPRIGHT[self.orientation]) if self.orientation != 1 else image
            rgb = to_rgb(upright, icc_to_srgb=icc_to_srgb)
            if rgb is not image:
                image.close()  # the decoded pixels: freed before the copy below, not after
            if rgb.size not in (expected, expected[::-1]):  # a header that lied about the size
                raise InvalidImage(f"{label} decoded to {rgb.size[0]}x{rgb.size[1]}, not its header's size")
        return np.array(rgb, dtype=np.uint8)


# EXIF orientation → the transpose that makes the pixels upright (as ImageOps.exif_transpose; `info` is kept).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
# EXIF orientation → (rows, columns) of the upright picture whose first pixel is the stored picture's last
# (the reduced decode's partial one): where `_UPRIGHT`'s transpose moves the stored last row and column.
_PARTIAL_FIRST = {1: (False, False), 2: (False, True), 3: (True, True), 4: (True, False), 5: (False, False),
                  6: (False, True), 7: (True, True), 8: (True, False)}
# JPEG's DCT-domain scalings (libjpeg-turbo also has 3/8, 5/8, ..., Pillow's `draft` asks only for these).
JPEG_REDUCTIONS = (8, 4, 2)


class SizeLimits(TypedDict):
    """The two size limits `open_image`, `decode_image` and `image_size` take, as one `**limits`."""
    max_pixels: int
    max_side: int


def open_image(data: bytes, *, max_pixels: int, max_side: int, label: str = "image") -> OpenedImage:
    """Check the bytes' structure and open the header (no pixel decoded); raises InvalidImage (400) or
    PayloadTooLarge (413) naming `label` for what `decode` would refuse before decoding."""
    if not data:
        raise InvalidImage(f"{label} is empty")
    check_structure(data, label)
    with _decode_errors(label):
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        width, height = image.size
        _check_size(width, height, max_pixels=max_pixels, max_side=max_side, label=label)
        return OpenedImage(image, data, label)


def decode_image(data: bytes, *, max_pixels: int, max_side: int, label: str = "image",
                 jpeg_device: torch.device | None = None, icc_to_srgb: bool = True,
                 isolation: Isolation | None = None) -> torch.Tensor:
    """Decode one image at full size; raises InvalidImage (400) or PayloadTooLarge (413) naming `label`.
    (`open_image`, then `OpenedImage.decode`.)"""
    opened = open_image(data, max_pixels=max_pixels, max_side=max_side, label=label)
    return opened.decode(jpeg_device=jpeg_device, icc_to_srgb=icc_to_srgb, isolation=isolation)


def image_size(data: bytes, *, max_pixels: int, max_side: int, label: str = "image") -> tuple[int, int]:
    """(width, height) as stored in the header, after the checks `decode_image` runs before decoding."""
    return open_image(data, max_pixels=max_pixels, max_side=max_side, label=label).stored


@contextlib.contextmanager
def _decode_errors(label: str) -> Iterator[None]:
    """Pillow's many ways of failing on a bad file → InvalidImage or PayloadTooLarge naming `label`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # in case a caller re-enabled Pillow's
            yield
    except (PayloadTooLarge, InvalidImage):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"{label} has too many pixels (a decompression bomb?)") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage(
            f"{label} is not a decodable image of an allowed format ({', '.join(ALLOWED_FORMATS)})"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise InvalidImage(f"{label} could not be decoded (truncated or corrupt)") from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's parsers raise others on crafted files (fuzzing found a TypeError in TIFF)
        raise InvalidImage(f"{label} could not be decoded (malformed)") from exc


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright, 2-8 = flipped/rotated), 1 when absent or unreadable."""
    try:
        value = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: Pillow's exif_transpose would not apply it either
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def device_decodable(image: Image.Image, *, icc_to_srgb: bool) -> bool:
    """Whether a JPEG can take the device decoder and come out as the CPU path's pixels.

    torchvision's CUDA decoder ignores EXIF orientation (only its CPU branch applies it) and knows
    nothing of colour profiles, so files tagged with either take the Pillow path; so do CMYK and
    other modes the device decoder does not convert like Pillow does.
    """
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return False
    if exif_orientation(image) != 1:
        return False
    return not (icc_to_srgb and image.info.get("icc_profile"))


def _decode_jpeg_on(data: bytes, device: torch.device) -> torch.Tensor | None:
    """torchvision's JPEG decoder on `device`, EXIF orientation applied; None where it cannot decode."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they still work,
            # and TorchCodec is not a dependency here. Revisit when torchvision is upgraded past the pin.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*image decoding")
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # truncated, or a variant the device decoder lacks: Pillow decides
        return None
    assert isinstance(decoded, torch.Tensor)
    return decoded.contiguous()


def _check_size(width: int, height: int, *, max_pixels: int, max_side: int, label: str) -> None:
    if width < 1 or height < 1:
        raise InvalidImage(f"{label} has no pixels ({width}x{height})")
    if max(width, height) > max_side:
        raise PayloadTooLarge(f"{label} is {width}x{height}; the longest side allowed is {max_side} px")
    if width * height > max_pixels:
        raise PayloadTooLarge(f"{label} is {width}x{height}; at most {max_pixels} pixels are allowed")
