"""Bytes → a checked uint8 (3, H, W) RGB tensor, before anything is queued.

Only an allow-list of formats is opened; the size is checked from the header before any pixel
is decoded (Pillow's own bomb guard stays on as a second line); EXIF orientation is applied; every
mode becomes 8-bit RGB the way a person would expect (alpha over white, 16-bit scaled, not clipped).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from service.core.errors import InvalidImage, PayloadTooLarge

# Pillow format ids: JPEG, PNG, WebP, GIF (first frame), BMP, TIFF (first page).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_WHITE = (255, 255, 255)


def decode_image(data: bytes, *, max_pixels: int, max_side: int, label: str = "image",
                 jpeg_device: torch.device | None = None) -> torch.Tensor:
    """Decode one image; raises InvalidImage (400) or PayloadTooLarge (413) naming `label`.

    With `jpeg_device` (the service passes its CUDA device), baseline RGB/grey JPEGs are decoded by
    torchvision there (nvJPEG on CUDA) and the tensor comes back on that device; the header checks above
    still run first, and any JPEG torchvision refuses takes the Pillow path instead.
    """
    if not data:
        raise InvalidImage(f"{label} is empty")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and above 2x its limit raises) for huge images; our own check below is stricter.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            _check_size(width, height, max_pixels=max_pixels, max_side=max_side, label=label)
            if jpeg_device is not None and image.format == "JPEG" and image.mode in ("RGB", "L"):
                decoded = _decode_jpeg_on(data, jpeg_device)
                if decoded is not None and tuple(decoded.shape[1:]) in ((height, width), (width, height)):
                    return decoded
            image.load()
            rgb = to_rgb(ImageOps.exif_transpose(image))
    except (PayloadTooLarge, InvalidImage):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"{label} has too many pixels (a decompression bomb?); "
                              f"at most {max_pixels} pixels are allowed") from exc
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
    array = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _decode_jpeg_on(data: bytes, device: torch.device) -> torch.Tensor | None:
    """torchvision's JPEG decoder on `device`, EXIF orientation applied; None where it cannot decode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they still work,
            # and TorchCodec is not a dependency here. Revisit when torchvision is upgraded past the pin.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*image decoding")
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:  # truncated, or a variant the device decoder lacks: Pillow decides
        return None
    assert isinstance(decoded, torch.Tensor)
    return decoded.contiguous()  # EXIF rotation can leave a strided view


def _check_size(width: int, height: int, *, max_pixels: int, max_side: int, label: str) -> None:
    if width < 1 or height < 1:
        raise InvalidImage(f"{label} has no pixels ({width}x{height})")
    if max(width, height) > max_side:
        raise PayloadTooLarge(f"{label} is {width}x{height}; the longest side allowed is {max_side} px")
    if width * height > max_pixels:
        raise PayloadTooLarge(f"{label} is {width}x{height}; at most {max_pixels} pixels are allowed")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB: alpha composited on white, 16-bit and 32-bit integer scaled."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (PNG/TIFF) greyscale; convert("L") would clip everything above 255 to white.
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode != "I" or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
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
