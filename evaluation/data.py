"""The labelled sample photos, and the seeded edits that turn each into a near-duplicate query."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from service.core.decode import decode_image

# The sample photos are ordinary web-sized JPEGs; these limits only guard against a stray huge file.
MAX_PIXELS = 50_000_000
MAX_SIDE = 20_000


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # ImageNet class index
    name: str  # class name, for reading tables


def load_samples(data_dir: Path, limit: int | None = None) -> list[Sample]:
    """Rows of `labels.tsv` (file, class_index, wnid, name), in file order; the first `limit` if given."""
    lines = (data_dir / "labels.tsv").read_text().splitlines()
    samples = []
    for line in lines[1:]:
        if not line.strip():
            continue
        file, class_index, _wnid, name = line.split("\t")[:4]
        samples.append(Sample(data_dir / file, int(class_index), name))
    return samples[:limit] if limit is not None else samples


def decode_file(path: Path) -> torch.Tensor:
    """A photo exactly as the service would see it: the service's decoder, uint8 (3, H, W)."""
    return decode_image(path.read_bytes(), max_pixels=MAX_PIXELS, max_side=MAX_SIDE, label=str(path))


@dataclass(frozen=True)
class QueryEdits:
    """The near-duplicate edits, all applied to every query, with per-query parameters from its seed."""

    crop_area: tuple[float, float] = (0.5, 0.8)  # kept fraction of the area, random position
    downscale: float = 0.5
    jpeg_quality: int = 30
    max_rotation_deg: float = 8.0
    jitter: float = 0.3  # brightness, contrast, saturation factors in [1 - jitter, 1 + jitter]
    grayscale: bool = True


def edit_query(image: Image.Image, rng: np.random.Generator, edits: QueryEdits) -> bytes:
    """One seeded edit chain: crop → rotate → colour jitter → grayscale → downscale → JPEG bytes."""
    width, height = image.size
    area = rng.uniform(*edits.crop_area)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w = min(width, round(math.sqrt(area * width * height * aspect)))
    crop_h = min(height, round(math.sqrt(area * width * height / aspect)))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    out = image.crop((left, top, left + crop_w, top + crop_h))
    out = out.rotate(rng.uniform(-edits.max_rotation_deg, edits.max_rotation_deg),
                     resample=Image.Resampling.BICUBIC, expand=False)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(rng.uniform(1 - edits.jitter, 1 + edits.jitter))
    if edits.grayscale:
        out = ImageOps.grayscale(out).convert("RGB")
    new_size = (max(1, round(out.width * edits.downscale)), max(1, round(out.height * edits.downscale)))
    out = out.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=None)
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=edits.jpeg_quality)
    return buffer.getvalue()


def make_query(path: Path, index: int, seed: int, edits: QueryEdits) -> torch.Tensor:
    """Query `index`: the photo at `path` edited with parameters drawn from (seed, index), decoded."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    data = edit_query(image, np.random.default_rng([seed, index]), edits)
    return decode_image(data, max_pixels=MAX_PIXELS, max_side=MAX_SIDE, label=f"query {index}")
