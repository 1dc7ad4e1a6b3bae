"""A decoded Pillow image of any mode → 8-bit sRGB, by one rule for every mode, and what that costs in memory.

The rule (docs/reliability.md states it for users):
1. Transparency is split off first, whatever carries it: an alpha channel (RGBA, LA, PA, La, RGBa), a
   palette's alpha, or a tRNS colour key (P, L, I;16 and RGB alike: pixels equal to the key are transparent).
2. The colours are read as intensities: 8-bit as they are; 16-bit and 32-bit integers scaled by 255/65535
   (32-bit images whose values all lie in 0-255 taken as 8-bit); floats in [0, 1] × 255, other floats on the
   0-255 scale, clipped, NaN → 0. Wide modes are converted in blocks of rows with float32/uint32
   arithmetic: no full-size float64 copy.
3. An embedded ICC profile for the colours' space (RGB, grey, CMYK) converts them to sRGB (relative
   colorimetric), for every mode — palette, grey, with or without alpha; an unreadable profile is ignored
   (the pixels are taken as sRGB, as browsers do), and so is an RGB profile that is sRGB already (its
   transform moves no colour by more than lcms's rounding of one level).
4. The result is composited over white by its alpha: out = c·a + 255·(1 − a).

ICC transforms are cached by the profile's SHA-256 in at most `ICC_CACHE_BYTES` of profiles; a profile
larger than a quarter of that is used without being cached.
"""

from __future__ import annotations

import collections
import hashlib
import io
import threading
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageCms, ImageOps

_WHITE = (255, 255, 255)
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# Profile colour space (as lcms names it, padded to 4) → the Pillow mode it applies to.
_PROFILE_MODES = {"RGB ": "RGB", "CMYK": "CMYK", "GRAY": "L"}
_ALPHA_MODES = {"RGBA": "RGB", "LA": "L", "PA": "RGB", "RGBa": "RGB", "La": "L"}
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ICC_CACHE_BYTES = 32 * 2**20
_ROWS_PER_BLOCK_PIXELS = 1 << 20  # wide modes are converted about this many pixels at a time

# Peak bytes held per pixel while one image of each mode is decoded and converted (the decoded image, the
# conversion's intermediates, the RGB result and its copy into the tensor): `python -m bench.hostile
# bytes-per-pixel` measured 10.0-10.2 for every mode but RGBA (12.0) and LA (11.0) at 20 MP, rounded up here;
# modes not measured are charged the most. (Before the block-wise wide-mode conversion: F 36.5, I;16 26.1.)
DECODE_BYTES_PER_PIXEL = {"1": 11, "L": 11, "P": 11, "RGB": 11, "CMYK": 11, "LA": 11, "RGBA": 12,
                          "I;16": 11, "I;16L": 11, "I;16B": 11, "I;16N": 11, "I": 11, "F": 11}
BUDGET_PIXEL_BYTES = DECODE_BYTES_PER_PIXEL["RGB"]  # the budget's unit: one pixel of the commonest path


def decode_bytes_per_pixel(mode: str) -> int:
    """Peak bytes per pixel of decoding and converting an image Pillow opens in `mode` (the largest known for
    a mode not in the table)."""
    return DECODE_BYTES_PER_PIXEL.get(mode, max(DECODE_BYTES_PER_PIXEL.values()))


def budget_pixels(width: int, height: int, mode: str) -> int:
    """What the pixel budget charges to decode a width×height image of `mode`: its pixels weighted by the
    bytes its decode path holds, in units of an 8-bit RGB image's (one definition, used wherever the budget
    is charged)."""
    return -(-width * height * decode_bytes_per_pixel(mode) // BUDGET_PIXEL_BYTES)


def to_rgb(image: Image.Image, *, icc_to_srgb: bool = True) -> Image.Image:
    """Any Pillow mode → 8-bit RGB by the module's rule; `icc_to_srgb` False skips step 3."""
    icc = image.info.get("icc_profile") if icc_to_srgb else None
    colour, alpha = _split_alpha(image)
    if icc:
        colour = _to_srgb(colour, icc)
    rgb = colour if colour.mode == "RGB" else colour.convert("RGB")
    if alpha is not None:
        if rgb is image:
            rgb = rgb.copy()
        # white pasted through the inverse of alpha: c·a + 255·(1 − a), in place
        rgb.paste(_WHITE, None, ImageOps.invert(alpha))
    return rgb


def _split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """(colours in an 8-bit or profile-ready mode, alpha as an L image or None)."""
    mode = image.mode
    key = image.info.get("transparency")
    if mode in _WIDE_MODES:
        return _wide_to_grey(image, key if isinstance(key, int) else None)
    if mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    elif mode == "P":
        palette_alpha = image.palette is not None and image.palette.mode == "RGBA"
        image = image.convert("RGBA" if key is not None or palette_alpha else "RGB")
        mode = image.mode
    elif key is not None and mode in ("1", "L", "RGB"):
        image = image.convert("LA" if mode in ("1", "L") else "RGBA")  # Pillow applies the tRNS key
        mode = image.mode
    if mode in _ALPHA_MODES:
        if mode in ("RGBa", "La"):  # premultiplied: undo it
            image = image.convert("RGBA" if mode == "RGBa" else "LA")
        colour_mode = _ALPHA_MODES[mode]
        bands = image.split()
        alpha = bands[-1]
        colour = Image.merge(colour_mode, bands[:-1]) if colour_mode == "RGB" else bands[0]
        if alpha.getextrema() == (255, 255):
            return colour, None
        return colour, alpha
    return image, None


def _row_blocks(image: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, the rows' values) for blocks of about `_ROWS_PER_BLOCK_PIXELS` pixels."""
    width, height = image.size
    step = max(1, _ROWS_PER_BLOCK_PIXELS // max(1, width))
    for top in range(0, height, step):
        yield top, np.asarray(image.crop((0, top, width, min(height, top + step))))


def _wide_to_grey(image: Image.Image, key: int | None) -> tuple[Image.Image, Image.Image | None]:
    """16/32-bit integer or float greyscale → (8-bit L, alpha from a tRNS key or None), block by block."""
    width, height = image.size
    grey = np.empty((height, width), dtype=np.uint8)
    alpha = np.empty((height, width), dtype=np.uint8) if key is not None else None
    if image.mode == "F":
        low, high, any_finite = np.inf, -np.inf, False
        for _, values in _row_blocks(image):
            finite = values[np.isfinite(values)]
            if finite.size:
                any_finite = True
                low, high = min(low, float(finite.min())), max(high, float(finite.max()))
        unit = any_finite and low >= 0.0 and high <= 1.0
        for top, values in _row_blocks(image):
            scaled = values.astype(np.float32)  # a writable copy of this block only
            if unit:
                scaled *= np.float32(255.0)
            np.nan_to_num(scaled, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
            np.clip(scaled, 0.0, 255.0, out=scaled)
            grey[top:top + len(scaled)] = np.rint(scaled, out=scaled)
    else:
        peak = 65535
        if image.mode == "I":
            peak = 65535 if max(int(v.max(initial=0)) for _, v in _row_blocks(image)) > 255 else 255
        for top, values in _row_blocks(image):
            clipped = np.clip(values, 0, peak).astype(np.uint32)
            # round(v × 255 / 65535) in integers: v × 255 < 2**24, and no v lands exactly on a half
            grey[top:top + len(clipped)] = (clipped * 255 + 32767) // 65535 if peak == 65535 else clipped
            if alpha is not None:
                alpha[top:top + len(values)] = np.where(values == key, 0, 255)
    return Image.fromarray(grey, "L"), None if alpha is None else Image.fromarray(alpha, "L")


def _to_srgb(colour: Image.Image, icc: bytes) -> Image.Image:
    """Colours in the profile's space → sRGB; untouched when the profile is for another space than the
    colours' mode, when it is sRGB already (`_moves_no_colour`), or when lcms cannot read or apply it."""
    try:
        transform = _transform_for(icc, colour.mode)
        if transform is None:
            return colour
        converted = ImageCms.applyTransform(colour, transform)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return colour
    assert converted is not None
    return converted


class _TransformCache:
    """lcms transforms by (SHA-256 of the profile, mode), least recently used first out, holding at most
    `limit` bytes of profiles: building one costs as much as applying it, and photos from one camera or
    editor share a handful of profiles; a cache keyed by the profiles themselves pinned 1 GB."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._entries: collections.OrderedDict[tuple[bytes, str], tuple[ImageCms.ImageCmsTransform | None, int]]
        self._entries = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
        key = (hashlib.sha256(icc).digest(), mode)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
        transform = _build_transform(icc, mode)
        if len(icc) <= self.limit // 4:
            with self._lock:
                if key not in self._entries:
                    self._entries[key] = (transform, len(icc))
                    self.held += len(icc)
                while self.held > self.limit:
                    _, (_, size) = self._entries.popitem(last=False)
                    self.held -= size
        return transform

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.held = 0


_TRANSFORMS = _TransformCache(ICC_CACHE_BYTES)


def _transform_for(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    return _TRANSFORMS.get(icc, mode)


def _build_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    if _PROFILE_MODES.get(profile.profile.xcolor_space) != mode:
        return None  # a profile for another colour space than the pixels': left as they are
    transform = ImageCms.buildTransform(profile, _SRGB, mode, "RGB",
                                        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
    if mode == "RGB" and _moves_no_colour(transform):
        return None  # sRGB already: applying it would cost 2.5 ms a 500×375 photo and only round a few colours
    return transform


# Every eighth level of each channel and 255: 33³ colours, about 1 ms through a transform.
_GRID_LEVELS = np.linspace(0, 255, 33).round().astype(np.uint8)
_GRID = np.stack(np.meshgrid(_GRID_LEVELS, _GRID_LEVELS, _GRID_LEVELS, indexing="ij"), axis=-1).reshape(33 * 33, 33, 3)


def _moves_no_colour(transform: ImageCms.ImageCmsTransform) -> bool:
    """Whether an RGB → sRGB transform changes no colour of a grid over the RGB cube by more than one level: an
    sRGB profile (a fifth of the sample photos carry one; lcms moves about 0.2 % of colours by one level
    through it). Profiles of other spaces move most colours by tens of levels."""
    moved = np.asarray(ImageCms.applyTransform(Image.fromarray(_GRID), transform), dtype=np.int16) - _GRID
    return int(np.abs(moved).max()) <= 1
