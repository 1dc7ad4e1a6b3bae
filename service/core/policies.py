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

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from models import Preprocess
from service.core.options import POLICY_NAMES, PolicyError, samples_for


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

    View s uses scales[s % len(scales)]; S beyond the number of scales cycles them again,
    flipped on odd cycles, so S=6 with three scales is every resolution plain and flipped.
    """

    scales: tuple[float, ...] = (1.0, 1 / math.sqrt(2), 0.5)
    name: Literal["multiscale"] = "multiscale"

    def __post_init__(self) -> None:
        if not self.scales or any(not 0 < s <= 4 for s in self.scales):
            raise PolicyError(f"multiscale scales must be in (0, 4], got {self.scales}")

    def plan(self, height: int, width: int, samples: int, seed: int, preprocess: Preprocess) -> list[View]:
        top, left, box_h, box_w = _center_box(height, width, preprocess)
        views = []
        for s in range(samples):
            cycle, index = divmod(s, len(self.scales))
            size = max(1, round(self.scales[index] * preprocess.input_size))
            views.append(View(top, left, box_h, box_w, size, cycle % 2 == 1, centered=True))
        return views


Policy = CenterPolicy | CropFlipPolicy | MultiscalePolicy


def make_policy(name: str, **params: object) -> Policy:
    """The policy factory: a name and optional parameters → a frozen, validated policy config."""
    if name == "center":
        return CenterPolicy(**params)  # type: ignore[arg-type]
    if name == "crop_flip":
        return CropFlipPolicy(**params)  # type: ignore[arg-type]
    if name == "multiscale":
        return MultiscalePolicy(**params)  # type: ignore[arg-type]
    raise PolicyError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


def plan_views(
    policy: Policy, image: torch.Tensor, samples: int, seed: int, preprocess: Preprocess
) -> list[View]:
    """Check the image and S, then plan the views of one image."""
    check_image(image)
    if samples < 1:
        raise PolicyError(f"samples must be at least 1, got {samples}")
    return policy.plan(int(image.shape[1]), int(image.shape[2]), samples, seed, preprocess)


def check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
        raise PolicyError(f"an image must be a uint8 tensor, got {getattr(image, 'dtype', type(image))}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise PolicyError(f"an image must have shape (3, H, W), got {tuple(image.shape)}")
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise PolicyError(f"an image must not be empty, got shape {tuple(image.shape)}")
