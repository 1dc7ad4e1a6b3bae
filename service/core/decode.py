"""Bytes → a checked uint8 (3, H, W) RGB tensor, before anything is queued.

Only an allow-list of formats is opened; files built to be slow to decode are refused from their bytes
first (`precheck`); the size is checked from the header before any pixel is decoded; EXIF orientation is
applied; an embedded ICC profile is converted to sRGB; every mode becomes 8-bit RGB the way a person would
expect (alpha over white, 16-bit scaled, not clipped, float scaled by the rule in `to_rgb`).

One pixel cap: `max_pixels` (the service's --max-image-pixels). Pillow's own bomb guard
(`Image.MAX_IMAGE_PIXELS`, 89.5 MP) is switched off at import because it fires in `Image.open`, before our
check, and silently lowered any larger setting; ours runs at the same point, from the same header.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageCms, UnidentifiedImageError

from service.core import bmp_rle
from service.core.errors import InvalidImage, PayloadTooLarge
from service.core.precheck import check_structure

# Pillow format ids: JPEG, PNG, WebP, GIF (first frame), BMP, TIFF (first page).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_WHITE = (255, 255, 255)
_ORIENTATION = 0x0112  # the EXIF tag
Image.MAX_IMAGE_PIXELS = None  # one cap, ours (see the module docstring)
bmp_rle.install()  # run-length BMPs at a cost that follows the file, not the pixels
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# Profile colour space (as lcms names it, padded to 4) → the Pillow mode it applies to.
_PROFILE_MODES = {"RGB ": "RGB", "CMYK": "CMYK", "GRAY": "L"}


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

    def decoded_pixels(self, reduction: int = 1) -> int:
        """Pixels a decode at `reduction` holds: what the pixel budget charges."""
        width, height = self.stored
        return -(-width // reduction) * -(-height // reduction)

    def decode(self, reduction: int = 1, *, jpeg_device: torch.device | None = None,
               icc_to_srgb: bool = True) -> torch.Tensor:
        """The pixels, uint8 (3, H, W) upright RGB, decoded at 1/`reduction` of the size on each side (rounded
        up, as libjpeg does); raises InvalidImage (400) naming the label.

        With `jpeg_device` (the service passes its CUDA device), JPEGs that need no pixel work beyond decoding
        (see `device_decodable`) are decoded by torchvision there (nvJPEG on CUDA) at full size and the tensor
        comes back on that device; any JPEG torchvision refuses takes the Pillow path. `icc_to_srgb`: convert
        an embedded ICC profile to sRGB (relative colorimetric); a profile lcms cannot read is ignored (the
        pixels are taken as sRGB, as browsers do).
        """
        image, label = self.image, self.label
        with _decode_errors(label):
            if jpeg_device is not None and device_decodable(image, icc_to_srgb=icc_to_srgb):
                decoded = _decode_jpeg_on(self.data, jpeg_device)
                # Only the stored shape: an orientation-tagged file never gets here (see device_decodable).
                if decoded is not None and tuple(decoded.shape[1:]) == (self.stored[1], self.stored[0]):
                    return decoded
            if reduction > 1:
                width, height = self.stored
                image.draft(image.mode, (width // reduction, height // reduction))
            expected = image.size
            image.load()
            # keeps `info`, the ICC profile with it; only when there is something to turn (else it copies)
            upright = image.transpose(_UPRIGHT[self.orientation]) if self.orientation != 1 else image
            rgb = to_rgb(to_srgb(upright) if icc_to_srgb else upright)
            if rgb.size not in (expected, expected[::-1]):  # a header that lied about the size
                raise InvalidImage(f"{label} decoded to {rgb.size[0]}x{rgb.size[1]}, not its header's size")
        # (3, H, W) over the decoder's H×W×3 pixels, not repacked: the renderer reads this interleaved layout
        # fastest (see `pixel_interleaved`), and one copy less per image.
        return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


# EXIF orientation → the transpose that makes the pixels upright (as ImageOps.exif_transpose; `info` is kept).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
# JPEG's DCT-domain scalings (libjpeg-turbo also has 3/8, 5/8, ..., Pillow's `draft` asks only for these).
JPEG_REDUCTIONS = (8, 4, 2)


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
                 jpeg_device: torch.device | None = None, icc_to_srgb: bool = True) -> torch.Tensor:
    """Decode one image at full size; raises InvalidImage (400) or PayloadTooLarge (413) naming `label`.
    (`open_image`, then `OpenedImage.decode`.)"""
    opened = open_image(data, max_pixels=max_pixels, max_side=max_side, label=label)
    return opened.decode(jpeg_device=jpeg_device, icc_to_srgb=icc_to_srgb)


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


def to_srgb(image: Image.Image) -> Image.Image:
    """Pixels in an embedded ICC profile's colour space → sRGB (relative colorimetric intent).

    Untouched when there is no profile, when it is for another colour space than the image's mode, or when
    lcms cannot read or apply it.
    """
    icc = image.info.get("icc_profile")
    if not icc:
        return image
    try:
        transform = _to_srgb_transform(icc, image.mode)
        if transform is None:
            return image
        converted = ImageCms.applyTransform(image, transform)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return image
    assert converted is not None
    return converted


@functools.lru_cache(maxsize=64)
def _to_srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The lcms transform from one embedded profile to sRGB, built once per profile: building it cost as
    much as applying it, and photos from one camera or editor share a handful of profiles."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    if _PROFILE_MODES.get(profile.profile.xcolor_space) != mode:
        return None  # a profile for another colour space than the pixels': left as they are
    return ImageCms.buildTransform(profile, _SRGB, mode, "RGB", renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)


def _decode_jpeg_on(data: bytes, device: torch.device) -> torch.Tensor | None:
    """torchvision's JPEG decoder on `device`, EXIF orientation applied; None where it cannot decode."""
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


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB: alpha composited on white, 16-bit and 32-bit integer scaled.

    Float (`F`) images: if every finite value lies in [0, 1] they are intensities in [0, 1] (× 255),
    otherwise values on the 0-255 scale; then clipped to [0, 255], NaN → 0, +inf → 255, -inf → 0.
    """
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (PNG/TIFF) greyscale; convert("L") would clip everything above 255 to white.
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode != "I" or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            values = values * 255.0
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)  # NaN/inf in float TIFFs: no garbage bytes
        return Image.fromarray(grey).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
