"""The fingerprint is a pure function of everything that changes pixels or numerics; equal fingerprints
mean comparable embeddings over the set-ups that run here."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from models import ModelOptions, create_model
from models.loaded import fingerprint
from models.spec import ModelError
from service.core.decode import decode_image
from service.core.embedding import embed
from service.testing import SAMPLE_DIR as SAMPLES
from tests.unit.test_decode import LIMITS, encode

SPEC = create_model("dummy", ModelOptions(mode="eager")).spec


def test_every_input_changes_the_fingerprint_cuda_and_nvjpeg_included() -> None:
    base = {"device_type": "cpu", "jpeg_decoder": "pillow", "color": "icc-srgb"}
    variants = [
        ("sha", "float32", "eager", base),
        ("sha2", "float32", "eager", base),
        ("sha", "bfloat16", "eager", base),
        ("sha", "float32", "torchscript", base),
        ("sha", "float32", "eager", {**base, "device_type": "cuda"}),  # other kernels and the float renderer
        ("sha", "float32", "eager", {**base, "device_type": "cuda", "jpeg_decoder": "nvjpeg"}),
        ("sha", "float32", "eager", {**base, "color": "none"}),
    ]
    prints = [fingerprint(sha, SPEC, dtype, mode, **kw) for sha, dtype, mode, kw in variants]
    assert len(set(prints)) == len(prints)
    assert prints == [fingerprint(sha, SPEC, dtype, mode, **kw) for sha, dtype, mode, kw in variants]  # pure
    assert fingerprint("sha", SPEC, "float32", "eager") == prints[0]  # the defaults: CPU, Pillow, ICC → sRGB
    with pytest.raises(ModelError, match="JPEG decoder"):
        fingerprint("sha", SPEC, "float32", "eager", jpeg_decoder="libjpeg?")


def test_the_model_reports_the_decoding_it_is_served_with() -> None:
    model = create_model("dummy", ModelOptions(mode="eager"))
    default = model.fingerprint
    model.set_decoding(jpeg_decoder="nvjpeg", color="icc-srgb")
    assert model.fingerprint != default
    model.set_decoding(jpeg_decoder="pillow", color="icc-srgb")
    assert model.fingerprint == default


def _photos() -> list[bytes]:
    if SAMPLES.is_dir():
        return [p.read_bytes() for p in sorted(SAMPLES.glob("*.JPEG"))[:6]]
    rng = np.random.default_rng(0)
    return [encode(Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)), "JPEG") for _ in range(3)]


def test_equal_fingerprints_embed_alike_and_different_set_ups_differ() -> None:
    """Set-ups runnable here (CPU): engines × colour handling, the same one built twice."""
    photos = _photos()
    runs = []
    for mode, icc in [("eager", True), ("eager", True), ("torchscript", True), ("eager", False)]:
        model = create_model("dummy", ModelOptions(mode=mode))
        model.set_decoding(jpeg_decoder="pillow", color="icc-srgb" if icc else "none")
        images = [decode_image(p, **LIMITS, icc_to_srgb=icc) for p in photos]
        means = embed(model, images, samples=1, policy="center", seed=0).embeddings
        runs.append((model.fingerprint, means / np.linalg.norm(means, axis=1, keepdims=True)))
    assert len({fp for fp, _ in runs}) == 3  # eager twice = one fingerprint; torchscript and colour differ
    for (fp_a, a), (fp_b, b) in itertools.combinations(runs, 2):
        if fp_a == fp_b:
            assert (a * b).sum(axis=1).min() >= 0.9999


def test_a_change_of_the_decodes_pixels_changes_the_fingerprint(monkeypatch) -> None:
    """Datasets written before the reduced decode's geometry was fixed are not resumed under the new one."""
    from models import loaded

    before = fingerprint("sha", SPEC, "float32", "eager")
    monkeypatch.setattr(loaded, "DECODE_REVISION", loaded.DECODE_REVISION + 1)
    assert fingerprint("sha", SPEC, "float32", "eager") != before
