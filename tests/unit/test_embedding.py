"""The library call `embed`: MeTTA's mean and variance, reproducibility, batching independence, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import ModelError, ModelOptions, create_model
from service.core.embedding import EmbedOptions, ImageJob, embed
from service.core.options import PolicyError
from service.core.policies import CropFlipPolicy
from service.core.render import render_view


@pytest.fixture(scope="module")
def dummy():
    return create_model("dummy", ModelOptions(mode="eager"))  # compiling would cost more than it saves


def image(seed: int, height: int = 150, width: int = 200) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("max_batch_crops", [32, 3])
def test_mean_and_variance_are_numpys_over_the_same_views(dummy, max_batch_crops: int) -> None:
    img = image(0)
    result = embed(dummy, [img], samples=10, policy="crop_flip", seed=5, return_variance=True,
                   max_batch_crops=max_batch_crops)
    # The same ten views, embedded one at a time by hand.
    job = ImageJob(img, EmbedOptions(10, CropFlipPolicy(), 5), dummy)
    views = np.stack([dummy.embed_views(render_view(job.source, v, dummy.spec.preprocess)[None])[0].numpy()
                      for v in job.render_views]).astype(np.float64)
    np.testing.assert_allclose(result.embeddings[0], views.mean(axis=0), rtol=1e-5, atol=1e-5)
    assert result.variances is not None
    np.testing.assert_allclose(result.variances[0], views.var(axis=0, ddof=1), rtol=1e-4, atol=1e-6)


def test_view_normalize_and_normalize(dummy) -> None:
    img = image(1)
    plain = embed(dummy, [img], samples=6, seed=1, return_variance=True)
    per_view = embed(dummy, [img], samples=6, seed=1, view_normalize=True, normalize=True, return_variance=True)
    assert np.isclose(np.linalg.norm(per_view.embeddings[0]), 1.0, atol=1e-5)
    assert not np.allclose(plain.embeddings[0] / np.linalg.norm(plain.embeddings[0]), per_view.embeddings[0])
    # Variance over unit vectors is small compared to the raw embedding's.
    assert per_view.variances is not None and plain.variances is not None
    assert per_view.variances[0].sum() < plain.variances[0].sum()


def test_same_seed_same_embedding_different_seed_different(dummy) -> None:
    img = image(2)
    a = embed(dummy, [img], samples=8, seed=11).embeddings[0]
    b = embed(dummy, [img], samples=8, seed=11).embeddings[0]
    c = embed(dummy, [img], samples=8, seed=12).embeddings[0]
    np.testing.assert_array_equal(a, b)
    assert cosine(a, c) < 0.9999


@pytest.mark.parametrize("policy", ["crop_flip", "multiscale"])
def test_embedding_alone_equals_embedding_among_others(dummy, policy: str) -> None:
    images = [image(3), image(4, 300, 120), image(5, 90, 90)]
    together = embed(dummy, images, samples=7, policy=policy, seed=9, max_batch_crops=5).embeddings
    for i, img in enumerate(images):
        alone = embed(dummy, [img], samples=7, policy=policy, seed=9, max_batch_crops=32).embeddings[0]
        np.testing.assert_allclose(together[i], alone, rtol=1e-4, atol=1e-4 * np.abs(alone).max())


def test_center_is_one_view(dummy) -> None:
    result = embed(dummy, [image(6)], samples=1, policy="center")
    assert result.embeddings.shape == (1, 16)
    with pytest.raises(PolicyError, match="exactly one view"):
        embed(dummy, [image(6)], samples=4, policy="center")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"samples": 0}, "at least 1"),
        ({"samples": -3}, "at least 1"),
        ({"samples": 1, "return_variance": True}, "at least 2 views"),
        ({"samples": 4, "policy": "zoom"}, "unknown policy"),
        ({"samples": 4, "seed": -1}, "seed"),
        ({"samples": 4, "seed": 2**53}, "seed"),
    ],
)
def test_bad_options_raise_typed_errors(dummy, kwargs: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        embed(dummy, [image(7)], **kwargs)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.zeros(3, 0, 5, dtype=torch.uint8), "must not be empty"),
        (torch.zeros(3, 5, 5, dtype=torch.float32), "uint8"),
        (torch.zeros(5, 5, 3, dtype=torch.uint8), r"\(3, H, W\)"),
    ],
)
def test_bad_images_raise_typed_errors(dummy, bad: torch.Tensor, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        embed(dummy, [bad], samples=2)


def test_no_images_and_unknown_model(dummy) -> None:
    with pytest.raises(PolicyError, match="no images"):
        embed(dummy, [], samples=2)
    with pytest.raises(ModelError, match=r"unknown model 'nope'; known models: .*dummy"):
        create_model("nope", ModelOptions())
