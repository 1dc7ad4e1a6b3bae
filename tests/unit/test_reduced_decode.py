"""Decoding at the scale the views need: a large JPEG is decoded at 1/2, 1/4 or 1/8 in the DCT domain, its
views keep the full picture's geometry, and their pixels stay close to the full decode's."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from models import create_model
from models.loaded import fingerprint
from service.core.decode import open_image
from service.core.embedding import EmbedOptions, ImageJob, decode_job, decode_reduction
from service.core.policies import make_policy
from service.core.render import render_view
from tests.unit.test_decode import LIMITS, encode


@pytest.fixture(scope="module")
def model():
    return create_model("sleep:0")  # no weights, the default model's preprocessing (224 px views)


def detailed(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth picture with fine detail at full resolution (noise, a 3-px grating): something to lose."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 200, y / height * 200, (x + y) / (width + height) * 255], axis=-1)
    base += 30 * np.sin(2 * np.pi * x / 3.0)[..., None] * (y < height / 3)[..., None]
    base += rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return encode(detailed(4032, 3024), "JPEG", quality=92, subsampling="4:2:0")  # a 12 MP phone photo


def options(policy: str, samples: int) -> EmbedOptions:
    return EmbedOptions(samples, make_policy(policy), seed=3)


# The 224-px central view of a 3024-px side is cut from 2,646 px: at 1/4 it keeps 2.95 source pixels per output
# pixel, enough for several views (REDUCED_DECODE_MARGIN 2.5), not for one alone (SINGLE_VIEW_MARGIN 4), which
# is decoded at 1/2. crop_flip's smallest boxes need 1/2 as well.
@pytest.mark.parametrize("policy, samples, reduction", [("multiscale", 3, 4), ("multiscale", 2, 4), ("center", 1, 2),
                                                         ("multiscale", 1, 2), ("crop_flip", 10, 2),
                                                         ("crop_flip", 32, 2)])
def test_a_large_jpeg_is_decoded_at_the_scale_its_views_need(large_jpeg: bytes, model, policy: str,
                                                              samples: int, reduction: int) -> None:
    opened = open_image(large_jpeg, **LIMITS)
    assert opened.size == (4032, 3024)
    assert decode_reduction(opened, options(policy, samples), model) == reduction
    decoded = opened.decode(reduction)
    assert tuple(decoded.shape) == (3, 3024 // reduction, 4032 // reduction)
    assert opened.decoded_pixels(reduction) == decoded.shape[1] * decoded.shape[2]  # what the budget charges


@pytest.mark.parametrize("policy, samples", [("multiscale", 6), ("center", 1), ("crop_flip", 10)])
def test_the_views_keep_the_full_decodes_geometry_and_nearly_its_pixels(large_jpeg: bytes, model,
                                                                        policy: str, samples: int) -> None:
    full = ImageJob(open_image(large_jpeg, **LIMITS).decode(), options(policy, samples), model)
    opened = open_image(large_jpeg, **LIMITS)
    reduced = decode_job(opened, options(policy, samples), model, decode_reduction(opened, options(policy, samples),
                                                                                    model))
    assert reduced.views == full.views and reduced.render_views == full.render_views  # same plan, same boxes
    assert reduced.source.shape == full.source.shape
    preprocess = model.spec.preprocess
    for view in full.render_views:
        a = render_view(full.source, view, preprocess).to(torch.float32)
        b = render_view(reduced.source, view, preprocess).to(torch.float32)
        assert (a - b).abs().mean() < 2.0  # levels of 255: the DCT-domain downscale is a slightly other filter


def test_an_exif_rotated_jpeg_is_planned_upright_and_decoded_upright_at_a_reduced_scale(model) -> None:
    upright = detailed(2250, 3000, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif.tobytes())
    opened = open_image(data, **LIMITS)
    assert opened.stored == (3000, 2250) and opened.size == (2250, 3000)
    reduction = decode_reduction(opened, options("multiscale", 3), model)
    assert reduction == 2  # 1/4 would keep 2.2 source pixels per output pixel of the central view
    decoded = opened.decode(reduction)
    assert tuple(decoded.shape) == (3, 1500, 1125)
    plain = open_image(encode(upright, "JPEG", quality=92), **LIMITS).decode(reduction)
    assert (decoded.to(torch.float32) - plain.to(torch.float32)).abs().mean() < 4.0


def test_small_photos_and_formats_without_a_reduced_decode_are_decoded_whole(large_jpeg: bytes, model) -> None:
    png = encode(Image.open(io.BytesIO(large_jpeg)), "PNG", compress_level=1)
    assert decode_reduction(open_image(png, **LIMITS), options("multiscale", 3), model) == 1
    small = encode(detailed(500, 375), "JPEG", quality=90)
    assert decode_reduction(open_image(small, **LIMITS), options("multiscale", 3), model) == 1


def test_the_decode_scaling_is_part_of_the_fingerprint(model) -> None:
    spec = model.spec
    assert fingerprint("sha", spec, "float32", "eager", scaling="full") != fingerprint("sha", spec, "float32", "eager")
    model.set_decoding(jpeg_decoder="pillow", color="icc-srgb", scaling="full")
    assert model.decoding == {"jpeg_decoder": "pillow", "color": "icc-srgb", "scaling": "full"}
    full = model.fingerprint
    model.set_decoding(jpeg_decoder="pillow", color="icc-srgb")
    assert model.fingerprint != full and model.decoding["scaling"] == "reduced"


def gratings(width: int, height: int) -> Image.Image:
    """Smooth gratings across both axes (periods 97 and 131 px): nothing for a reduced decode's low-pass to take
    away, everything for a view sampled a fraction of a pixel off to show."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    value = 128 + 60 * np.sin(2 * np.pi * x / 97) + 60 * np.sin(2 * np.pi * y / 131)
    return Image.fromarray(np.repeat(np.clip(value, 0, 255).astype(np.uint8)[..., None], 3, axis=2))


# EXIF orientation → the transpose that stores an upright picture so that the orientation turns it upright again.
_STORED = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
           7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", sorted(_STORED))
def test_a_reduced_decode_keeps_the_geometry_when_a_side_is_not_a_multiple_of_the_scale(model,
                                                                                         orientation: int) -> None:
    """libjpeg decodes a 4021 × 3023 picture at 1/4 as 1006 × 756 pixels, the last ones covering 1 and 3 source
    pixels; after an EXIF flip or turn they may come first. The working copy is the full decode's wherever
    they are (resized by the sizes instead, it drifted by up to a quarter of a pixel: 3–6 levels RMS here)."""
    upright = gratings(4021, 3023)
    exif = Image.Exif()
    exif[0x0112] = orientation
    turn = _STORED[orientation]
    stored = upright if turn is None else upright.transpose(turn)
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    for policy, samples in (("center", 1), ("multiscale", 3)):
        full = ImageJob(open_image(data, **LIMITS).decode(), options(policy, samples), model)
        opened = open_image(data, **LIMITS)
        assert opened.size == (4021, 3023)
        reduced = decode_job(opened, options(policy, samples), model, 4)
        assert reduced.render_views == full.render_views and reduced.source.shape == full.source.shape
        difference = reduced.source.to(torch.float32) - full.source.to(torch.float32)
        assert float(difference.square().mean().sqrt()) < 1.0, (policy, orientation)



def test_the_scale_factor_of_a_reduced_resize_always_covers_the_working_copy() -> None:
    """torch takes the output size as floor(decoded × scale): where that product lands a hair under n in floating
    point (a side that is a multiple of the scale), the scale is raised by its last bits, never by more."""
    from service.core.render import _covering_scale

    for side in range(2000, 3100):
        for d in (2, 4, 8):
            for wanted in (112, 224, 256, 341):
                exact = wanted * d / side
                scale = _covering_scale(-(-side // d), wanted, exact)
                assert int(-(-side // d) * scale) >= wanted
                assert scale - exact <= 4 * math.ulp(exact)
