"""The device renderer: one batched resampling call per image and output size, pixels close to the CPU's."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from models import LoadedModel, create_model
from service.core import embedding, render
from service.core.decode import decode_image
from service.core.embedding import EmbedOptions, ImageJob
from service.core.policies import make_policy
from service.core.render import render_view, render_views_on_device


def photo(seed: int = 0, height: int = 300, width: int = 400) -> torch.Tensor:
    """A smooth synthetic picture (gradients and blobs), closer to a photo than noise."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rng = np.random.default_rng(seed)
    channels = [np.sin(rng.uniform(2, 9) * x + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 9) * y) for _ in range(3)]
    pixels = (np.stack(channels) * 127 + 128).clip(0, 255).astype(np.uint8)
    return torch.from_numpy(pixels)


def device_model(model: LoadedModel) -> LoadedModel:
    """The same model, but its render path thinks it is on CUDA (the kernels still run on the CPU)."""
    fake = mock.Mock(wraps=model)
    fake.device = torch.device("cuda")
    fake.spec = model.spec
    fake.normalize_float = lambda x: x.float().sub_(model._mean).div_(model._std)
    return fake


@pytest.mark.parametrize("policy, samples", [("crop_flip", 8), ("multiscale", 6)])
def test_one_resampling_call_per_image_and_output_size(policy: str, samples: int) -> None:
    model = create_model("dummy")
    jobs = [ImageJob(photo(seed), EmbedOptions(samples, make_policy(policy), seed), model) for seed in range(3)]
    chunks = [job.take(samples) for job in jobs]
    sizes = {view.size for view in chunks[0].views}
    with mock.patch.object(render, "resample_batch", wraps=render.resample_batch) as resample:
        rendered = embedding.render_batch(device_model(model), chunks)
    assert resample.call_count == len(jobs) * len(sizes)
    assert sum(group.pixels.shape[0] for group in rendered.groups) == len(jobs) * samples


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double() - 127.5, b.flatten().double() - 127.5
    return float(a @ b / (a.norm() * b.norm()))


def sample_photos(sample_dir: Path, count: int) -> list[torch.Tensor]:
    paths = sorted(sample_dir.glob("*.JPEG"))[:count]
    return [decode_image(p.read_bytes(), max_pixels=40_000_000, max_side=12_000) for p in paths]


@pytest.mark.parametrize("policy, samples", [("crop_flip", 16), ("multiscale", 6), ("center", 1)])
def test_device_pixels_stay_comparable_with_the_cpu_renderer(sample_dir: Path, policy: str, samples: int) -> None:
    model = create_model("sleep:0")  # the default model's preprocessing (bicubic, 224 px) at no cost
    preprocess = model.spec.preprocess
    worst = 1.0
    for seed, image in enumerate(sample_photos(sample_dir, 20)):
        job = ImageJob(image, EmbedOptions(samples, make_policy(policy), seed), model)
        for view in job.render_views:
            cpu = render_view(job.source, view, preprocess)
            device = render_views_on_device(job.source, [view], preprocess)[0]
            worst = min(worst, cosine(cpu, device))
    assert worst >= 0.9995  # measured 0.99991; the default model's embeddings of them: cosine >= 0.9991


def test_two_chunks_of_one_image_in_a_batch_still_make_one_call() -> None:
    model = create_model("dummy")
    job = ImageJob(photo(7), EmbedOptions(32, make_policy("crop_flip"), 7), model)
    chunks = [job.take(16), job.take(16)]  # a lone request's two turns in one batch
    with mock.patch.object(render, "resample_batch", wraps=render.resample_batch) as resample:
        rendered = embedding.render_batch(device_model(model), chunks)
    assert resample.call_count == 1
    assert sorted(rendered.groups[0].places) == [(c, v) for c in range(2) for v in range(16)]


# ------------------------------------------------------------------------------------ the CPU renderer

@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_cpu_views_are_torchvisions_pixels_and_stay_pixel_interleaved(interpolation: str) -> None:
    """Each view is exactly torchvision's resized_crop (+ flip) and keeps the source's interleaved layout, so
    its copy into a channels-last batch row is a straight pass, not a transpose."""
    preprocess = dataclasses.replace(create_model("dummy").spec.preprocess, interpolation=interpolation)
    image = render.pixel_interleaved(photo(3, 375, 500))
    views = make_policy("crop_flip").plan(375, 500, 16, 3, preprocess)
    mode = TF.InterpolationMode.BICUBIC if interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
    for view in views:
        expected = TF.resized_crop(image, view.top, view.left, view.height, view.width, [view.size] * 2,
                                   interpolation=mode, antialias=True)
        got = render_view(image, view, preprocess)
        assert torch.equal(got, expected.flip(-1) if view.flip else expected)
        assert got.stride(0) == 1, f"view {view} came back planar: strides {got.stride()}"


@pytest.mark.parametrize("input_format", [torch.channels_last, torch.contiguous_format])
def test_normalising_view_by_view_into_the_batch_gives_normalizes_values(input_format: torch.memory_format) -> None:
    dummy = create_model("dummy")
    model = LoadedModel(dummy.spec, dummy.forward, device=dummy.device, dtype=dummy.dtype, mode=dummy.mode,
                        fingerprint="test", input_format=input_format)
    image = render.pixel_interleaved(photo(5))
    views = [render_view(image, v, model.spec.preprocess)
             for v in make_policy("crop_flip").plan(300, 400, 8, 5, model.spec.preprocess)]
    batch = model.new_batch(len(views), views[0].shape[-1])
    for row, view in enumerate(views):
        model.normalize_into(view, batch[row])
    assert batch.is_contiguous(memory_format=input_format)
    assert torch.equal(batch, model.normalize(torch.stack(views)))
