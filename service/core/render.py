"""Pixels of planned views: the one-time downscale of a working copy, its cut to the views' boxes, then each
view cut and resized.

Two renderers with the same pixels (up to the CPU's rounding to uint8): on the CPU, uint8 antialiased
resizes from a pixel-interleaved working copy, one view at a time (measured fastest there: a batched
`roi_align` was 2–6× slower); on CUDA, every view of one image that shares an output size in one batched
resampling on the device (separable weight matrices). Normalisation is the model's job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from models import Preprocess
from service.core.decode import ReducedGeometry
from service.core.policies import View


def pixel_interleaved(image: torch.Tensor) -> torch.Tensor:
    """The same (3, H, W) pixels stored as H×W×3 (channels_last). torch's uint8 antialiased resize works
    on interleaved pixels, so rendering from this layout skips a repack of the source per view: measured
    ~1.9× faster per crop_flip view on a 500×375 photo, pixel for pixel the same result."""
    if image.stride(0) == 1:
        return image
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)



def render_view(image: torch.Tensor, view: View, preprocess: Preprocess) -> torch.Tensor:
    """The pixels of one view: crop, antialiased resize to (size, size), its flip; uint8, in the image's layout."""
    if (view.height, view.width) == (view.size, view.size):
        out = image[:, view.top : view.top + view.size, view.left : view.left + view.size]  # no resampling
    else:
        out = resize_box(image, view, preprocess)
    return flip_width(out) if view.flip else out


def resize_box(image: torch.Tensor, view: View, preprocess: Preprocess) -> torch.Tensor:
    """The view's box, resized to (size, size) with antialiasing: torchvision's `resized_crop`, pixel for pixel.

    A pixel-interleaved image's box is handed to torch as a channels-last batch of one, so it is resized
    interleaved and comes back interleaved. torchvision lets torch allocate a strided box's output
    planar, and torch's uint8 kernel then repacks it: 1.4× the time here, and the copy into a
    channels-last batch row must then transpose it back.
    """
    box = image[:, view.top : view.top + view.height, view.left : view.left + view.width]
    mode = _interpolation(preprocess)
    if image.device.type != "cpu" or image.stride(0) != 1:
        planar: torch.Tensor = TF.resize(box, [view.size, view.size], interpolation=mode, antialias=True)
        return planar
    resized: torch.Tensor = F.interpolate(_batch_of_one(box), size=[view.size, view.size], mode=mode.value,
                                          align_corners=False, antialias=True)
    return resized[0]


def _batch_of_one(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) as a (1, 3, H, W) batch in its own layout. A batch of one may have any batch stride; one past
    the whole image makes a pixel-interleaved one's strides read as channels-last."""
    if image.stride(0) != 1:
        return image.unsqueeze(0)
    return image.unsqueeze(0).as_strided((1, *image.shape), (image.stride(1) * image.shape[1], *image.stride()))


def flip_width(pixels: torch.Tensor) -> torch.Tensor:
    """Mirror (3, H, W) pixels left to right, in their own layout: torch's flip returns pixel-interleaved
    input planar, and the copy into an interleaved (channels-last) batch row would then transpose it."""
    if pixels.stride(0) == 1:
        return pixels.permute(1, 2, 0).flip(1).permute(2, 0, 1)
    return pixels.flip(-1)


def views_scale(views: Sequence[View]) -> float:
    """The fraction of the image's resolution its views need: output pixels per source pixel of the view that
    needs the most (1 or more: full resolution)."""
    return max(view.size / min(view.height, view.width) for view in views)


def shrink_for_views(image: torch.Tensor, views: list[View], preprocess: Preprocess,
                     reduced: ReducedGeometry | None = None) -> tuple[torch.Tensor, list[View]]:
    """Downscale the image once so no view needs more than ~1 source pixel per output pixel.

    A 500×375 photo's center box (328 px) is resized to 224 px anyway; resizing the whole image
    once (to 341×256 here, exactly the classic Resize(256) step) makes every later crop cheaper,
    and for large photos it is most of the saving. Returns the working image and the views mapped
    onto it; images whose views all need full resolution come back unchanged.

    `reduced`: where `image`'s pixels lie on the picture the views were planned on, when it is a reduced decode
    of it (a JPEG decoded at 1/2, 1/4 or 1/8 scale): the working copy and the mapped views are the same size
    and boxes as from the full decode, resampled from fewer source pixels along the same geometry
    (`resize_reduced`).
    """
    height, width = (reduced.height, reduced.width) if reduced else (int(image.shape[1]), int(image.shape[2]))
    factor = views_scale(views)
    if factor >= _SHRINK_WORTH_IT and not reduced:
        return image, views
    factor = min(factor, 1.0)
    # Shorter side first, the longer one as torchvision's Resize(int) derives it (truncated).
    short, long = min(height, width), max(height, width)
    new_short = max(1, round(short * factor))
    new_long = max(1, int(new_short * long / short))
    new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    if reduced is None:
        small = TF.resize(image, [new_h, new_w], interpolation=_interpolation(preprocess), antialias=True)
    else:
        small = resize_reduced(image, (new_h, new_w), reduced, preprocess)
    sy, sx = new_h / height, new_w / width
    scale = new_short / short  # one scale for box sides keeps square boxes square
    mapped = []
    for view in views:
        box_h = max(1, min(new_h, round(view.height * scale)))
        box_w = max(1, min(new_w, round(view.width * scale)))
        if view.centered:  # CenterCrop's own rounding on the resized image
            top, left = round((new_h - box_h) / 2), round((new_w - box_w) / 2)
        else:
            top, left = min(new_h - box_h, round(view.top * sy)), min(new_w - box_w, round(view.left * sx))
        mapped.append(View(top, left, box_h, box_w, view.size, view.flip, view.centered))
    return small, mapped


_SHRINK_WORTH_IT = 0.9  # below 10% smaller, a second resampling is not worth its cost


def resize_reduced(image: torch.Tensor, size: tuple[int, int], reduced: ReducedGeometry,
                   preprocess: Preprocess) -> torch.Tensor:
    """A reduced decode resized to `size`, the full picture's working copy, along the full picture's geometry.

    Output pixel j of an axis of n pixels samples the full picture at (j + ½)·L/n, which is (j + ½)·L/(n·d) in
    decoded pixels: torch's scale factor is n·d/L (output pixels per decoded pixel), not n over the decoded
    size. The two differ where L is not a multiple of d (libjpeg rounds the decoded size up): resized by the
    sizes, a 4021-px side decoded at 1/4 drifts by up to a quarter of an output pixel across the picture, and
    the central crop of a 12 MP photo fell to cosine 0.997 of the full decode's embedding. An axis whose
    partial pixel comes first is mirrored around the resize so that it is last (an antialiased resize commutes
    with a mirror).
    """
    new_h, new_w = size
    d = reduced.denominator
    if tuple(image.shape[1:]) != (-(-reduced.height // d), -(-reduced.width // d)):
        raise ValueError(f"a {tuple(image.shape[1:])} image is not a 1/{d} decode of {reduced.height}x{reduced.width}")
    mirrored = [axis for axis, first in zip((1, 2), reduced.partial_first, strict=True) if first]
    source = _mirror(image, mirrored)
    scales = [_covering_scale(int(source.shape[1]), new_h, new_h * d / reduced.height),
              _covering_scale(int(source.shape[2]), new_w, new_w * d / reduced.width)]
    # A reduced decode is Pillow's, on the CPU: torch's uint8 antialiased resize, as `TF.resize` there.
    resized = F.interpolate(_batch_of_one(source), scale_factor=scales, mode=_interpolation(preprocess).value,
                            align_corners=False, antialias=True, recompute_scale_factor=False)[0]
    return _mirror(resized[:, :new_h, :new_w], mirrored)


def _covering_scale(decoded: int, wanted: int, scale: float) -> float:
    """`scale`, raised by the last bits of a float where `decoded` × `scale` would fall short of `wanted` output
    pixels in floating point (torch truncates that product to the output size; in exact arithmetic it is at
    least `wanted`, as the decoded side covers the whole picture)."""
    while math.floor(decoded * scale) < wanted:
        scale = math.nextafter(scale, math.inf)
    return scale


def _mirror(pixels: torch.Tensor, axes: list[int]) -> torch.Tensor:
    """(3, H, W) pixels mirrored along `axes` (1: rows, 2: columns), in their own layout (see `flip_width`)."""
    if not axes:
        return pixels
    if pixels.stride(0) == 1:
        return pixels.permute(1, 2, 0).flip([axis - 1 for axis in axes]).permute(2, 0, 1)
    return pixels.flip(axes)


def crop_to_views(image: torch.Tensor, views: list[View]) -> tuple[torch.Tensor, list[View]]:
    """Keep only the pixels some view reads: the image cut to the bounding box of the views' boxes (whole
    pixels, after any downscale), and the views moved onto the cut copy.

    Every renderer reads a view's box and nothing around it (resampling taps outside the box are dropped),
    so each view renders to exactly the same pixels from the cut copy. A panorama's central views keep a
    square of it, not the whole strip. The cut is a fresh tensor in the source's layout (pixel-interleaved
    stays interleaved), so the full image's storage is freed; an image every view spans comes back as is.
    """
    top = min(view.top for view in views)
    left = min(view.left for view in views)
    bottom = max(view.top + view.height for view in views)
    right = max(view.left + view.width for view in views)
    if (top, left, bottom, right) == (0, 0, int(image.shape[1]), int(image.shape[2])):
        return image, views
    box = image[:, top:bottom, left:right]
    cut = box.permute(1, 2, 0).contiguous().permute(2, 0, 1) if image.stride(0) == 1 else box.contiguous()
    moved = [View(v.top - top, v.left - left, v.height, v.width, v.size, v.flip, v.centered) for v in views]
    return cut, moved


def _interpolation(preprocess: Preprocess) -> TF.InterpolationMode:
    return TF.InterpolationMode.BICUBIC if preprocess.interpolation == "bicubic" else TF.InterpolationMode.BILINEAR


def render_views_on_device(image: torch.Tensor, views: Sequence[View], preprocess: Preprocess) -> torch.Tensor:
    """The views of one image that share an output size, in one batched resampling: float (K, 3, s, s).

    An antialiased resize of a crop is separable: rows, then columns, each a weighted sum of source
    pixels with weights that depend only on the box and the output size. So every view of the image
    is two batched matrix products with per-view weight matrices (`resample_weights`, the same filter
    taps as torchvision's antialiased resize), whatever the boxes, flips included, rounded to whole levels
    as the CPU renderer's uint8 pixels are. Runs wherever `image` lives (CUDA in the service).
    """
    size = views[0].size
    if any(view.size != size for view in views):
        raise ValueError("render_views_on_device takes views of one output size")
    height, width = int(image.shape[1]), int(image.shape[2])
    kind = preprocess.interpolation
    rows = np.stack([resample_weights(v.top, v.height, height, size, kind) for v in views])
    cols = np.stack([resample_weights(v.left, v.width, width, size, kind)[:: -1 if v.flip else 1] for v in views])
    return resample_batch(image, torch.from_numpy(rows), torch.from_numpy(cols))


def resample_batch(image: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(3, H, W) source, (K, s, H) row weights, (K, s, W) column weights → (K, 3, s, s) float pixels."""
    source = image.to(torch.float32).unsqueeze(0)  # (1, 3, H, W)
    rows = rows.to(image.device, non_blocking=True).unsqueeze(1)  # (K, 1, s, H)
    cols = cols.to(image.device, non_blocking=True).unsqueeze(1)  # (K, 1, s, W)
    out = torch.matmul(torch.matmul(rows, source), cols.transpose(-1, -2))
    return out.round_().clamp_(0, 255)  # as the CPU renderer's uint8 result: the same pixels, not just close


def resample_weights(start: int, length: int, in_size: int, out_size: int, interpolation: str) -> np.ndarray:
    """(out_size, in_size) weights resizing pixels [start, start + length) to out_size, antialiased.

    Pillow's (and torchvision's antialiased) scheme: output pixel i is centred at (i + ½)·scale in the
    crop; the filter (triangle for bilinear, Keys cubic with a = −½ for bicubic) is stretched by the
    scale when shrinking; taps outside the crop are dropped and the rest renormalised.
    """
    scale = length / out_size
    stretch = max(scale, 1.0)
    support = (2.0 if interpolation == "bicubic" else 1.0) * stretch
    centers = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centers + support + 0.5).astype(np.int64), length)
    taps = int((last - first).max())
    index = first[:, None] + np.arange(taps)[None, :]
    distance = (index - centers[:, None] + 0.5) / stretch
    weights = _cubic(distance) if interpolation == "bicubic" else np.maximum(0.0, 1.0 - np.abs(distance))
    weights = np.where(index < last[:, None], weights, 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    out = np.zeros((out_size, in_size), dtype=np.float32)
    # Taps past the crop carry weight 0; clipping their index keeps them in the array (and adds nothing).
    np.add.at(out, (np.arange(out_size)[:, None], np.minimum(index, length - 1) + start), weights)
    return out


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    result: np.ndarray = np.where(x < 1, near, np.where(x < 2, far, 0.0))
    return result
