"""The working copy a queued image holds: downscaled once, then cut to the views' boxes, with the same pixels."""

from __future__ import annotations

import pytest
import torch

from models import Preprocess, create_model
from service.core.embedding import EmbedOptions, ImageJob
from service.core.policies import CenterPolicy, make_policy
from service.core.render import (
    crop_to_views,
    pixel_interleaved,
    render_view,
    render_views_on_device,
    shrink_for_views,
)

PRE = Preprocess(input_size=224, resize_size=256, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
SHAPES = [(375, 500), (256, 12_000), (9_000, 300), (1500, 2000), (100, 120), (224, 224)]


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("height, width", SHAPES)
@pytest.mark.parametrize("policy, samples", [("center", 1), ("multiscale", 6), ("crop_flip", 8)])
def test_every_view_renders_the_same_pixels_from_the_cut_copy(height: int, width: int, policy: str,
                                                               samples: int) -> None:
    image = pixel_interleaved(random_image(height, width, seed=height + width))
    views = make_policy(policy).plan(height, width, samples, 3, PRE)
    small, small_views = shrink_for_views(image, views, PRE)
    cut, cut_views = crop_to_views(small, small_views)
    assert cut.stride(0) == 1 and cut.shape[1] <= small.shape[1] and cut.shape[2] <= small.shape[2]
    for before, after in zip(small_views, cut_views, strict=True):
        assert after.top >= 0 and after.top + after.height <= cut.shape[1]
        assert after.left >= 0 and after.left + after.width <= cut.shape[2]
        assert torch.equal(render_view(small, before, PRE), render_view(cut, after, PRE))
        if small.shape[1] * small.shape[2] > 1_000_000:
            continue  # the device renderer's matrices span the whole source: kept to small sources for speed
        # Its float sums may round a level differently (another matrix width, another summation order).
        device = render_views_on_device(small, [before], PRE) - render_views_on_device(cut, [after], PRE)
        assert device.abs().max() <= 1 and (device != 0).float().mean() < 0.01


def test_the_center_view_is_still_resize_then_center_crop() -> None:
    image = random_image(375, 500)
    small, views = shrink_for_views(image, CenterPolicy().plan(375, 500, 1, 0, PRE), PRE)
    cut, cut_views = crop_to_views(small, views)
    classic = small[:, 16:240, 58:282]  # Resize(256) → 256×341, CenterCrop(224)
    assert tuple(cut.shape) == (3, 224, 224) and torch.equal(cut, classic)
    assert torch.equal(render_view(cut, cut_views[0], PRE), classic)


def test_a_copy_every_view_spans_is_not_copied_and_a_cut_one_frees_the_image() -> None:
    image = random_image(300, 400)
    whole = [view for view in make_policy("crop_flip").plan(300, 400, 1, 0, PRE)]
    spanning = [type(whole[0])(0, 0, 300, 400, 224, False)]
    assert crop_to_views(image, spanning)[0] is image
    cut, _ = crop_to_views(image, [type(whole[0])(10, 20, 100, 100, 224, False)])
    assert cut.untyped_storage().nbytes() == 3 * 100 * 100  # its own storage, not a view of the image


@pytest.mark.parametrize("policy, samples", [("center", 1), ("multiscale", 3), ("crop_flip", 8)])
def test_a_queued_panorama_holds_a_square_of_itself_not_the_strip(policy: str, samples: int) -> None:
    model = create_model("sleep:0")
    job = ImageJob(random_image(256, 12_000), EmbedOptions(samples, make_policy(policy), 1), model)
    assert job.pixels <= 256 * 342 and job.source.untyped_storage().nbytes() == 3 * job.pixels
