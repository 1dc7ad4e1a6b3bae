"""Augmentation policies: geometry within bounds, reproducible, and the classic center crop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from models import Preprocess, create_model
from service.core.embedding import embed
from service.core.options import PolicyError
from service.core.policies import (
    CenterPolicy,
    CropFlipPolicy,
    MultiscalePolicy,
    TenCropPolicy,
    make_policy,
    plan_views,
)
from service.core.render import render_view, shrink_for_views

PRE = Preprocess(input_size=224, resize_size=256, mean=(0.5,) * 3, std=(0.5,) * 3)


def random_image(height: int = 375, width: int = 500, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize(("height", "width"), [(375, 500), (500, 375), (64, 1000), (1000, 40), (1, 1)])
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.25, 1.0), (0.7, 1.0)])
def test_crop_flip_views_stay_inside_and_respect_ranges(height: int, width: int, scale: tuple) -> None:
    policy = CropFlipPolicy(scale=scale)
    views = policy.plan(height, width, 200, seed=7, preprocess=PRE)
    assert len(views) == 200
    for view in views:
        assert view.top >= 0 and view.top + view.height <= height
        assert view.left >= 0 and view.left + view.width <= width
        assert view.size == 224
    if height >= 64 and width >= 64 and 3 / 4 <= width / height <= 4 / 3:
        # Ordinary photos: every view comes from a successful try, so it respects scale and ratio
        # (up to rounding its sides to whole pixels).
        for view in views:
            slack = 2.5 / min(view.height, view.width)
            fraction = view.height * view.width / (height * width)
            assert scale[0] * (1 - 2 * slack) <= fraction <= scale[1] * (1 + 2 * slack)
            assert 3 / 4 * (1 - 2 * slack) <= view.width / view.height <= 4 / 3 * (1 + 2 * slack)
    flips = sum(v.flip for v in views)
    assert 60 < flips < 140  # p = 0.5


def test_crop_flip_is_reproducible_and_prefix_stable() -> None:
    policy = CropFlipPolicy()
    a = policy.plan(375, 500, 32, seed=3, preprocess=PRE)
    assert a == policy.plan(375, 500, 32, seed=3, preprocess=PRE)
    assert a[:10] == policy.plan(375, 500, 10, seed=3, preprocess=PRE)
    assert a != policy.plan(375, 500, 32, seed=4, preprocess=PRE)


def test_multiscale_sizes_plain_then_flipped_then_new_sizes() -> None:
    views = MultiscalePolicy().plan(375, 500, 8, seed=0, preprocess=PRE)
    assert [v.size for v in views] == [224, 158, 112, 224, 158, 112, 188, 133]  # 7th on: sizes between the scales
    assert [v.flip for v in views] == [False, False, False, True, True, True, False, False]
    # Every view is the same central box: smaller inputs, not zoomed crops.
    assert len({(v.top, v.left, v.height, v.width) for v in views}) == 1
    image = random_image()
    assert [tuple(render_view(image, v, PRE).shape) for v in views[:3]] == [(3, 224, 224), (3, 158, 158),
                                                                            (3, 112, 112)]


def test_center_is_one_view_and_refuses_more() -> None:
    assert len(CenterPolicy().plan(375, 500, 1, 0, PRE)) == 1
    with pytest.raises(PolicyError, match="exactly one view"):
        CenterPolicy().plan(375, 500, 2, 0, PRE)


def test_center_embeds_like_classic_pipeline(sample_labels: list) -> None:
    """The service's center view embeds like torchvision's Resize(256) → CenterCrop(224) on PIL."""
    model = create_model("efficientnet_lite0")
    pre = model.spec.preprocess
    interpolation = transforms.InterpolationMode(pre.interpolation)
    classic = transforms.Compose([transforms.Resize(pre.resize_size, interpolation),
                                  transforms.CenterCrop(pre.input_size), transforms.PILToTensor()])
    for path, _ in sample_labels[:8]:
        pil = Image.open(path).convert("RGB")
        image = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous()
        ours = embed(model, [image], samples=1, policy="center").embeddings[0]
        theirs = model.embed_views(classic(pil).unsqueeze(0))[0].numpy()
        assert ours @ theirs / (np.linalg.norm(ours) * np.linalg.norm(theirs)) >= 0.999


def test_rendered_flip_mirrors_the_unflipped_view() -> None:
    image = random_image()
    view = CropFlipPolicy(flip_p=0.0).plan(375, 500, 1, 5, PRE)[0]
    flipped = CropFlipPolicy(flip_p=1.0).plan(375, 500, 1, 5, PRE)[0]
    assert (view.top, view.left, view.height, view.width) == (flipped.top, flipped.left, flipped.height,
                                                              flipped.width)
    assert torch.equal(render_view(image, flipped, PRE), render_view(image, view, PRE).flip(-1))


@pytest.mark.parametrize(
    ("image", "samples", "message"),
    [
        (torch.zeros(3, 0, 10, dtype=torch.uint8), 1, "must not be empty"),
        (torch.zeros(3, 10, 10, dtype=torch.float32), 1, "uint8"),
        (torch.zeros(10, 10, dtype=torch.uint8), 1, r"shape \(3, H, W\)"),
        (torch.zeros(4, 10, 10, dtype=torch.uint8), 1, r"shape \(3, H, W\)"),
        (torch.zeros(3, 10, 10, dtype=torch.uint8), 0, "at least 1"),
    ],
)
def test_bad_input_raises_typed_errors(image: torch.Tensor, samples: int, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        plan_views(CropFlipPolicy(), image, samples, 0, PRE)


def test_policy_factory_validates() -> None:
    multiscale = make_policy("multiscale", scales=(1.0, 0.5))
    assert isinstance(multiscale, MultiscalePolicy) and multiscale.scales == (1.0, 0.5)
    with pytest.raises(PolicyError, match=r"unknown policy .zoom.; choose one of center, crop_flip, multiscale, ten_"):
        make_policy("zoom")
    with pytest.raises(PolicyError, match="scale"):
        CropFlipPolicy(scale=(0.5, 0.2))
    with pytest.raises(PolicyError, match="scales"):
        MultiscalePolicy(scales=())
    assert make_policy("ten_crop", resize_scale=1.125) == TenCropPolicy(resize_scale=1.125)
    with pytest.raises(PolicyError, match="resize_scale"):
        TenCropPolicy(resize_scale=0.1)
    assert math.isclose(MultiscalePolicy().scales[1], 1 / math.sqrt(2))


def test_shrink_once_keeps_views_inside_and_center_becomes_the_classic_resize() -> None:
    image = random_image(375, 500)
    center = CenterPolicy().plan(375, 500, 1, 0, PRE)
    small, mapped = shrink_for_views(image, center, PRE)
    assert tuple(small.shape) == (3, 256, 341)  # Resize(shorter side → 256)
    assert (mapped[0].height, mapped[0].width, mapped[0].size) == (224, 224, 224)  # then a plain crop
    big = random_image(1500, 2000)
    views = CropFlipPolicy().plan(1500, 2000, 64, 1, PRE)
    small, mapped = shrink_for_views(big, views, PRE)
    assert small.shape[1] < 1500
    for view in mapped:
        assert view.top >= 0 and view.top + view.height <= small.shape[1]
        assert view.left >= 0 and view.left + view.width <= small.shape[2]
        assert min(view.height, view.width) >= 0.95 * view.size  # still ~1 source pixel per output pixel
    # Upsampling views (boxes smaller than the output) leave the image untouched.
    tiny = random_image(100, 120)
    assert shrink_for_views(tiny, CropFlipPolicy().plan(100, 120, 4, 0, PRE), PRE)[0] is tiny


@pytest.mark.parametrize(("height", "width"), [(375, 500), (500, 375), (64, 1000), (1, 1)])
@pytest.mark.parametrize("resize_scale", [1.0, 1.125])
def test_ten_crop_is_the_center_then_four_corners_then_their_mirrors(height: int, width: int,
                                                                      resize_scale: float) -> None:
    policy = TenCropPolicy(resize_scale=resize_scale)
    views = policy.plan(height, width, 10, seed=0, preprocess=PRE)
    box = views[0].height
    assert box == max(1, round(min(height, width) * 224 / (256 * resize_scale)))
    assert all((v.height, v.width, v.size) == (box, box, 224) for v in views)
    corners = [(0, 0), (0, width - box), (height - box, 0), (height - box, width - box)]
    assert [(v.top, v.left) for v in views[1:5]] == corners  # each corner box touches its two edges
    assert [v.flip for v in views] == [False] * 5 + [True] * 5
    assert [(v.top, v.left, v.centered) for v in views[5:]] == [(v.top, v.left, v.centered) for v in views[:5]]
    assert [v.centered for v in views[:5]] == [True, False, False, False, False]
    # deterministic: no seed, and every S is a prefix (S=5: the five crops)
    assert views == policy.plan(height, width, 10, seed=99, preprocess=PRE)
    assert policy.plan(height, width, 5, seed=0, preprocess=PRE) == views[:5]


def test_ten_crop_starts_with_the_central_crop_and_stops_at_ten() -> None:
    assert TenCropPolicy().plan(375, 500, 1, 0, PRE) == CenterPolicy().plan(375, 500, 1, 0, PRE)
    assert TenCropPolicy(resize_scale=1.125).plan(375, 500, 1, 0, PRE)[0].height == round(375 * 224 / 288)
    with pytest.raises(PolicyError, match="at most 10 distinct views"):
        TenCropPolicy().plan(375, 500, 11, 0, PRE)


def test_ten_crop_embeds_like_torchvisions_ten_crop(sample_labels: list) -> None:
    """Our ten views embed like torchvision's Resize(256) → TenCrop(224) on PIL (its order: four corners,
    center, then the same mirrored)."""
    model = create_model("efficientnet_lite0")
    pre = model.spec.preprocess
    interpolation = transforms.InterpolationMode(pre.interpolation)
    resize = transforms.Resize(pre.resize_size, interpolation)
    classic_order = [1, 2, 3, 4, 0, 6, 7, 8, 9, 5]  # torchvision's tl, tr, bl, br, center → ours
    for path, _ in sample_labels[:3]:
        pil = Image.open(path).convert("RGB")
        image = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous()
        ours = embed(model, [image], samples=10, policy="ten_crop").embeddings[0]
        crops = transforms.TenCrop(pre.input_size)(resize(pil))
        theirs = model.embed_views(torch.stack([transforms.functional.pil_to_tensor(crops[i]) for i in
                                                range(10)]))
        per_view = [embed(model, [image], samples=s, policy="ten_crop").embeddings[0] for s in (1, 5)]
        assert ours @ theirs.numpy().mean(0) / (np.linalg.norm(ours) * np.linalg.norm(theirs.numpy().mean(0))) >= 0.999
        five = theirs.numpy()[[classic_order.index(i) for i in range(5)]].mean(0)
        assert per_view[1] @ five / (np.linalg.norm(per_view[1]) * np.linalg.norm(five)) >= 0.999
