"""Round 2's device checks for `bench/gpu.sh`: render calls per batch, EXIF-rotated JPEGs, the bf16 service.

Each runs on the device given (CUDA where one is lent; on the CPU the same code runs as a dry run, and says
where its figures mean nothing there).
"""

from __future__ import annotations

import io
from typing import Any
from unittest import mock

import numpy as np
import torch
from PIL import Image

from service.testing import Photos


def render_calls(device: str, pictures: Photos) -> dict[str, Any]:
    """Resampling calls in one batch of 4 images (crop_flip S=32 in two chunks each; multiscale S=6): on CUDA
    the goal is one per image and output size."""
    from models import ModelOptions, create_model
    from service.core import render
    from service.core.decode import decode_image
    from service.core.embedding import EmbedOptions, ImageJob, render_batch
    from service.core.policies import make_policy

    model = create_model("efficientnet_lite0", ModelOptions(device=device, mode="eager"))
    images = [decode_image(p, max_pixels=40_000_000, max_side=12_000) for p in pictures.images[:4]]
    out: dict[str, Any] = {"device": device}
    for policy, samples in (("crop_flip", 32), ("multiscale", 6)):
        jobs = [ImageJob(image, EmbedOptions(samples, make_policy(policy), i), model) for i, image in enumerate(images)]
        chunks = [chunk for job in jobs for chunk in (job.take(samples // 2), job.take(samples))]
        sizes = len({view.size for view in jobs[0].views})
        with mock.patch.object(render, "resample_batch", wraps=render.resample_batch) as resample:
            render_batch(model, chunks)
        out[policy] = {"images": len(jobs), "sizes_per_image": sizes, "resample_calls": resample.call_count,
                       "goal": len(jobs) * sizes if device.startswith("cuda") else "n/a (per-view on the CPU)",
                       "pass": resample.call_count == len(jobs) * sizes if device.startswith("cuda") else None}
    return out


def exif_rotation(device: str, pictures: Photos) -> dict[str, Any]:
    """A JPEG tagged EXIF orientation 6 (stored sideways) against the same pixels stored upright, both through
    the service's decoder with JPEGs decoded on `device`: same shape, embeddings cosine ≥ 0.999."""
    from models import ModelOptions, create_model
    from service.core.decode import decode_image
    from service.core.embedding import embed

    model = create_model("efficientnet_lite0", ModelOptions(device=device, mode="eager" if device != "cpu" else "auto"))
    jpeg_device = torch.device(device) if device.startswith("cuda") else None
    rows = []
    for data in pictures.images[:8]:
        upright = Image.open(io.BytesIO(data)).convert("RGB")
        sideways = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns this back upright
        exif = Image.Exif()
        exif[0x0112] = 6
        tagged, plain = io.BytesIO(), io.BytesIO()
        sideways.save(tagged, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())
        upright.save(plain, "JPEG", quality=100, subsampling=0)
        a = decode_image(tagged.getvalue(), max_pixels=40_000_000, max_side=12_000, jpeg_device=jpeg_device)
        b = decode_image(plain.getvalue(), max_pixels=40_000_000, max_side=12_000, jpeg_device=jpeg_device)
        means = embed(model, [a.cpu(), b.cpu()], samples=1, policy="center").embeddings
        cosine = float(means[0] @ means[1] / (np.linalg.norm(means[0]) * np.linalg.norm(means[1])))
        rows.append({"same_shape": tuple(a.shape) == tuple(b.shape), "cosine": cosine})
    worst = min(row["cosine"] for row in rows)
    return {"device": device, "photos": pictures.source, "images": len(rows), "min_cosine": worst,
            "pass": all(row["same_shape"] for row in rows) and worst >= 0.999}
