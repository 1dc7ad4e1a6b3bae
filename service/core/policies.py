"""Augmentation policies: seeded view geometry (plan) and the pixels of those views (render).

A policy turns one decoded image into S views. Planning is pure geometry: boxes in image
coordinates, output sizes and flips, drawn from a generator seeded by the request's seed alone, so
views depend only on (image size, policy config, S, seed) — never on the image's position in a
request or on what it is batched with. View s of a plan for S also equals view s of a plan for any
larger S (prefix-stable), so "S=10" is always the first ten views of "S=32".

Rendering cuts those boxes out of the uint8 (3, H, W) tensor decoded once per image and resizes
them with antialiasing; normalisation to floats is the model's job, not the policy's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from service.core.options import POLICY_NAMES, PolicyError, samples_for

if TYPE_CHECKING:  # not at run time: `metta embed --server` checks S here on a machine that may have no torch
    import torch

    from models import Preprocess


@dataclass(frozen=True)
class View:
    """One augmented view: the box (top, left, height, width) in image pixels, output side, flip.

    `centered` marks the classic central box: when the image is downscaled once, its offset is
    recomputed on the smaller image the way Resize → CenterCrop does, so it lands on the same pixels.
    """

    top: int
    left: int
    height: int
    width: int
    size: int
    flip: bool
    centered: bool = False


def _center_box(height: int, width: int, preprocess: Preprocess) -> tuple[int, int, int, int]:
    """The classic Resize(shorter=resize_size) → CenterCrop(input_size) box, in original pixels."""
    side = min(height, width) * preprocess.input_size / preprocess.resize_size
    box_h = max(1, min(height, round(side)))
    box_w = max(1, min(width, round(side)))
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


@dataclass(frozen=True)
class CenterPolicy:
    """The baseline every result is compared with: one central crop (S is always 1)."""

    name: Literal["center"] = "center"

    def plan(self, height: int, width: int, samples: int, seed: int, preprocess: Preprocess) -> list[View]:
        samples_for(self.name, samples, 1)
        top, left, box_h, box_w = _center_box(height, width, preprocess)
        return [View(top, left, box_h, box_w, preprocess.input_size, False, centered=True)]


@dataclass(frozen=True)
class CropFlipPolicy:
    """Random resized crop (area fraction in `scale`, aspect ratio in `ratio`) + horizontal flip."""

    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    name: Literal["crop_flip"] = "crop_flip"

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise PolicyError(f"crop_flip scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise PolicyError(f"crop_flip ratio must satisfy 0 < low <= high, got {self.ratio}")
        if not 0 <= self.flip_p <= 1:
            raise PolicyError(f"crop_flip flip_p must be in [0, 1], got {self.flip_p}")

    def plan(self, height: int, width: int, samples: int, seed: int, preprocess: Preprocess) -> list[View]:
        rng = np.random.default_rng(seed)
        return [self._one_view(rng, height, width, preprocess) for _ in range(samples)]

    def _one_view(self, rng: np.random.Generator, height: int, width: int, preprocess: Preprocess) -> View:
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        # A fixed number of draws per view (10 tries × area, ratio, top, left; then the flip) keeps
        # later views independent of how many tries earlier ones needed: view s is the same for all S > s.
        tries = rng.random((10, 4))
        flip = bool(rng.random() < self.flip_p)
        for u_area, u_ratio, u_top, u_left in tries:
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u_area)
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
            box_w = round(math.sqrt(target * aspect))
            box_h = round(math.sqrt(target / aspect))
            if 0 < box_w <= width and 0 < box_h <= height:
                top = int(u_top * (height - box_h + 1))
                left = int(u_left * (width - box_w + 1))
                return View(top, left, box_h, box_w, preprocess.input_size, flip)
        # No try fitted (extreme aspect ratio): the largest central box inside the ratio range.
        box_h, box_w = _largest_box_in_ratio(height, width, self.ratio)
        return View((height - box_h) // 2, (width - box_w) // 2, box_h, box_w, preprocess.input_size, flip)


def _largest_box_in_ratio(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    aspect = width / height
    if aspect < ratio[0]:
        return max(1, round(width / ratio[0])), width
    if aspect > ratio[1]:
        return height, max(1, round(height * ratio[1]))
    return height, width


@dataclass(frozen=True)
class MultiscalePolicy:
    """The central crop fed at several input resolutions (smaller inputs, not zoomed crops).

    The first 2 × len(scales) views are every scale plain, then every scale flipped (S=6 with three
    scales: 224, 158, 112 px, then the same flipped). Beyond them come new resolutions between the
    largest and smallest scale, bisecting the log-scale gaps level by level (188 and 133 px first),
    each new size plain then flipped, skipping any (size, flip) already used: no view ever repeats.
    A plan asks for more views than the scales can make distinct at this input size → PolicyError.
    """

    scales: tuple[float, ...] = (1.0, 1 / math.sqrt(2), 0.5)
    name: Literal["multiscale"] = "multiscale"

    def __post_init__(self) -> None:
        if not self.scales or any(not 0 < s <= 4 for s in self.scales):
            raise PolicyError(f"multiscale scales must be in (0, 4], got {self.scales}")

    def plan(self, height: int, width: int, samples: int, seed: int, preprocess: Preprocess) -> list[View]:
        top, left, box_h, box_w = _center_box(height, width, preprocess)
        return [View(top, left, box_h, box_w, size, flip, centered=True)
                for size, flip in self.sizes(samples, preprocess.input_size)]

    def sizes(self, samples: int, input_size: int) -> list[tuple[int, bool]]:
        """(input side, flip) of the first `samples` views; the same list prefix for every S."""
        out: list[tuple[int, bool]] = []
        for size, flip in self._all_sizes(input_size):
            if len(out) == samples:
                return out
            out.append((size, flip))
        if len(out) < samples:
            raise PolicyError(f"multiscale with scales {self.scales} makes at most {len(out)} distinct views "
                              f"at {input_size} px input, not {samples}")
        return out

    def _all_sizes(self, input_size: int) -> Iterator[tuple[int, bool]]:
        def side(log_scale: float) -> int:
            return max(1, round(2**log_scale * input_size))

        seen: set[tuple[int, bool]] = set()
        base = [side(math.log2(s)) for s in self.scales]
        for flip in (False, True):
            for size in base:
                if (size, flip) not in seen:  # a scale set naming one size twice
                    seen.add((size, flip))
                    yield size, flip
        logs = sorted({math.log2(s) for s in self.scales}, reverse=True)
        gaps = list(itertools.pairwise(logs))
        # Each level halves every gap; once a whole level adds no new size, the pixel sizes are exhausted.
        while gaps:
            mids = [(high + low) / 2 for high, low in gaps]
            new = [size for size in dict.fromkeys(side(m) for m in mids) if (size, False) not in seen]
            for flip in (False, True):
                for size in new:
                    seen.add((size, flip))
                    yield size, flip
            if not new and all(side(high) - side(low) <= 1 for high, low in gaps):
                return
            gaps = [pair for (high, low), mid in zip(gaps, mids, strict=True) for pair in ((high, mid), (mid, low))]


@dataclass(frozen=True)
class TenCropPolicy:
    """The classic deterministic ten crops: the central box, the four corner boxes, then the same five
    mirrored (S=1 is the central crop, S=5 the five crops, S=10 the ten; at most 10 views).

    Boxes are square, `resize_scale` × the classic Resize → Crop ratio smaller than the shorter side:
    1 is the model's own Resize(resize_size) → input_size crop (256 → 224), 1.125 crops 224 of a 288-px
    resize (the boxes cover less of the photo, so the corners differ more from the centre). No seed is used.
    """

    resize_scale: float = 1.0
    name: Literal["ten_crop"] = "ten_crop"

    def __post_init__(self) -> None:
        if not 0.5 <= self.resize_scale <= 4:
            raise PolicyError(f"ten_crop resize_scale must be in [0.5, 4], got {self.resize_scale}")

    def plan(self, height: int, width: int, samples: int, seed: int, preprocess: Preprocess) -> list[View]:
        samples_for(self.name, samples, samples)  # at most MOST_VIEWS["ten_crop"] = 10
        side = min(height, width) * preprocess.input_size / (preprocess.resize_size * self.resize_scale)
        box = max(1, min(height, width, round(side)))
        center_top, center_left, center_h, center_w = (height - box) // 2, (width - box) // 2, box, box
        boxes = [(center_top, center_left, True), (0, 0, False), (0, width - box, False), (height - box, 0, False),
                 (height - box, width - box, False)]
        views = [View(top, left, center_h, center_w, preprocess.input_size, flip, centered=centered)
                 for flip in (False, True) for top, left, centered in boxes]
        return views[:samples]


Policy = CenterPolicy | CropFlipPolicy | MultiscalePolicy | TenCropPolicy


def make_policy(name: str, **params: object) -> Policy:
    """The policy factory: a name and optional parameters → a frozen, validated policy config."""
    if name == "center":
        return CenterPolicy(**params)  # type: ignore[arg-type]
    if name == "crop_flip":
        return CropFlipPolicy(**params)  # type: ignore[arg-type]
    if name == "multiscale":
        return MultiscalePolicy(**params)  # type: ignore[arg-type]
    if name == "ten_crop":
        return TenCropPolicy(**params)  # type: ignore[arg-type]
    raise PolicyError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


def check_samples(policy_name: str, samples: int, *, max_samples: int, input_size: int | None) -> None:
    """The limits on S that every door applies (the server, `metta embed`): the `max_samples` setting, then
    the views the policy can make distinct at the model's input size. PolicyError names the bound."""
    if samples > max_samples:  # before the policy's own limit, which may be above this one
        raise PolicyError(f"at most {max_samples}, got {samples}")
    if policy_name == "multiscale" and input_size is not None:
        MultiscalePolicy().sizes(samples, input_size)  # raises when the sizes cannot make that many views


def plan_views(
    policy: Policy, image: torch.Tensor, samples: int, seed: int, preprocess: Preprocess
) -> list[View]:
    """Check the image and S, then plan the views of one image."""
    check_image(image)
    if samples < 1:
        raise PolicyError(f"samples must be at least 1, got {samples}")
    return policy.plan(int(image.shape[1]), int(image.shape[2]), samples, seed, preprocess)


def check_image(image: torch.Tensor) -> None:
    import torch

    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
        raise PolicyError(f"an image must be a uint8 tensor, got {getattr(image, 'dtype', type(image))}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise PolicyError(f"an image must have shape (3, H, W), got {tuple(image.shape)}")
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise PolicyError(f"an image must not be empty, got shape {tuple(image.shape)}")
