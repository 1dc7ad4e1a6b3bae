"""Classification pieces: shipped temperatures, the calibrated prediction, label names, the label-free
score, and multiscale plans without repeated views."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models import Preprocess
from models.calibration import CALIBRATION_FILE, UNCALIBRATED, Temperature, s_bucket, temperature_for
from models.imagenet_labels import imagenet_labels, labels_for
from models.policy_quality import POLICY_QUALITY_FILE, markdown_table
from service.core.classify import Head, predict
from service.core.options import PolicyError
from service.core.policies import MultiscalePolicy
from service.core.uncertainty import label_free_uncertainty
from tests.conftest import REPO

ENTRY = {"model": "m", "weights_sha256": "abc",
         "temperatures": {"crop_flip": {"1": 0.9, "2-4": 0.8, "5-16": 0.7, "17+": 0.6}, "center": {"1": 0.5}}}


@pytest.mark.parametrize(("samples", "bucket"), [(1, "1"), (2, "2-4"), (4, "2-4"), (5, "5-16"), (16, "5-16"),
                                                 (17, "17+"), (128, "17+")])
def test_s_buckets(samples: int, bucket: str) -> None:
    assert s_bucket(samples) == bucket


def test_temperature_lookup_needs_model_weights_policy_and_bucket() -> None:
    entries = (ENTRY,)
    assert temperature_for("m", "abc", "crop_flip", 8, entries) == Temperature(0.7, True)
    assert temperature_for("m", "abc", "crop_flip", 32, entries) == Temperature(0.6, True)
    assert temperature_for("m", "abc", "center", 1, entries) == Temperature(0.5, True)
    assert temperature_for("m", "other weights", "crop_flip", 8, entries) == UNCALIBRATED
    assert temperature_for("other", "abc", "crop_flip", 8, entries) == UNCALIBRATED
    assert temperature_for("m", "abc", "multiscale", 3, entries) == UNCALIBRATED
    assert Temperature(1.0, False) == UNCALIBRATED


def test_the_shipped_calibration_covers_every_policy_and_bucket() -> None:
    data = json.loads(CALIBRATION_FILE.read_text())
    entry = next(e for e in data["models"] if e["model"] == "efficientnet_lite0")
    assert set(entry["temperatures"]["crop_flip"]) == {"1", "2-4", "5-16", "17+"}
    assert set(entry["temperatures"]["multiscale"]) == {"1", "2-4", "5-16", "17+"}
    assert set(entry["temperatures"]["center"]) == {"1"}
    assert all(0.2 < t < 5 for policy in entry["temperatures"].values() for t in policy.values())


def test_predict_is_the_calibrated_softmax_of_the_head() -> None:
    rng = np.random.default_rng(0)
    head = Head(rng.normal(size=(6, 4)), rng.normal(size=6), None)
    means = rng.normal(size=(3, 4))
    logits = (means @ head.weight.T + head.bias) / 0.5
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    predictions = predict(head, means, 0.5, top_k=3)
    for row, prediction in zip(probs, predictions, strict=True):
        assert prediction.classes == np.argsort(-row)[:3].tolist()
        assert np.allclose(prediction.probabilities, np.sort(row)[::-1][:3])
        assert prediction.max_probability == pytest.approx(row.max())
        assert prediction.entropy == pytest.approx(-(row * np.log(row)).sum())
    assert len(predict(head, means, 1.0, top_k=50)[0].classes) == 6  # top_k beyond the classes: all of them


def test_imagenet_labels_are_offline_and_ordered() -> None:
    names = imagenet_labels()
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"
    assert labels_for(1000) is names and labels_for(10) is None


def test_label_free_uncertainty_is_the_scale_free_participation_ratio() -> None:
    assert label_free_uncertainty(np.array([1.0, 0.0, 0.0])) == 1.0  # one feature: most certain
    assert label_free_uncertainty(np.ones(4)) == pytest.approx(2.0)  # all equal: √dim
    x = np.abs(np.random.default_rng(1).normal(size=(2, 16)))
    assert np.allclose(label_free_uncertainty(x), label_free_uncertainty(3 * x))
    assert label_free_uncertainty(np.zeros(3)) == 0.0


@pytest.mark.parametrize("input_size", [224, 64])
def test_multiscale_never_repeats_a_view_up_to_its_limit(input_size: int) -> None:
    pre = Preprocess(input_size=input_size, resize_size=input_size * 8 // 7, mean=(0.5,) * 3, std=(0.5,) * 3)
    policy = MultiscalePolicy()
    limit = 226 if input_size == 224 else 66  # every side from ½ to 1 × input, plain and flipped
    views = policy.plan(375, 500, limit, 0, pre)
    assert len(set(views)) == len(views) == limit
    assert views[:6] == policy.plan(375, 500, 6, 0, pre)  # the first six are the classic three scales ×2
    assert [v.size for v in views[:6]] == [round(s * input_size) for s in (1, 2**-0.5, 0.5)] * 2
    for samples in (7, 33, 128):  # prefix-stable: S views are the first S of any larger plan
        if samples <= limit:
            assert policy.plan(375, 500, samples, 0, pre) == views[:samples]
    with pytest.raises(PolicyError, match=f"at most {limit} distinct views"):
        policy.plan(375, 500, limit + 1, 0, pre)


def test_readme_table_is_rendered_from_the_figures_file() -> None:
    assert POLICY_QUALITY_FILE.is_file()
    assert markdown_table("efficientnet_lite0") in (REPO / "README.md").read_text()


def test_every_figures_row_is_what_v1_models_serves_with_its_paired_intervals() -> None:
    from service.api.schemas import PolicyFigures
    from service.settings import Settings

    rows = [PolicyFigures.model_validate(row)
            for row in json.loads(POLICY_QUALITY_FILE.read_text())["models"]["efficientnet_lite0"]["rows"]]
    assert rows[0].request == {"policy": "center"} and rows[0].vs_center is None  # the baseline
    for row in rows[1:]:  # every other row: differences from the centre with their 95 % intervals
        assert row.vs_center is not None and row.vs_center.photos == 500
        for difference in (row.vs_center.top1, row.vs_center.nll_calibrated, row.vs_center.ece):
            assert difference.lo <= difference.diff <= difference.hi
    defaults = Settings()
    marked = [row for row in rows if "/v1/classify default" in row.views]
    assert [row.request for row in marked] == [{"policy": defaults.classify_policy,
                                                "samples": defaults.classify_samples}]
