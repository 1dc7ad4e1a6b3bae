"""The label-free study's pieces: its candidates, the held-out choice and the fitted combination."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import metrics as M
from evaluation.label_free import (
    SHIPPED,
    combination,
    held_out_choice,
    pooled_candidates,
    spatial_candidates,
)
from service.core.uncertainty import label_free_uncertainty


def test_pooled_candidates_include_the_shipped_score_and_see_only_the_views() -> None:
    rng = np.random.default_rng(0)
    views = rng.uniform(0.0, 6.0, size=(5, 4, 32))
    scores = pooled_candidates(views)
    assert np.allclose(scores[SHIPPED], label_free_uncertainty(views.mean(axis=1)))
    assert np.allclose(scores["mean_norm"], np.linalg.norm(views.mean(axis=1), axis=1))
    identical = pooled_candidates(np.repeat(views[:, :1], 4, axis=1))
    assert np.allclose(identical["dispersion"], 0.0)  # views that agree exactly do not disperse
    assert all(score.shape == (5,) for score in scores.values())


def test_spatial_candidates_tell_a_uniform_map_from_a_peaked_one() -> None:
    uniform = np.ones((1, 8, 4, 4))
    peaked = np.zeros((1, 8, 4, 4))
    peaked[0, :, 1, 2] = 1.0  # every feature in one cell
    flat, peak = spatial_candidates(uniform), spatial_candidates(peaked)
    assert flat["spatial entropy of activation"][0] == pytest.approx(np.log(16))
    assert peak["spatial entropy of activation"][0] == pytest.approx(0.0)
    assert flat["1 − mean cos(cell, image)"][0] == pytest.approx(0.0)  # every cell is the whole image
    assert flat["‖mean-pool‖ / ‖max-pool‖"][0] == pytest.approx(1.0)
    assert peak["‖mean-pool‖ / ‖max-pool‖"][0] == pytest.approx(1 / 16)


def test_the_choice_is_reported_on_the_half_it_was_not_made_on() -> None:
    rng = np.random.default_rng(1)
    error = rng.random(400) < 0.2
    half = np.arange(400) % 2
    informative = error + rng.normal(scale=0.5, size=400)
    lucky = rng.normal(size=400)
    lucky[half == 0] = error[half == 0] * 10.0  # perfect on the even half only: chance on the odd one
    folds = held_out_choice({"informative": informative, "lucky": lucky}, error, half)["folds"]
    assert folds[0]["chosen"] == "lucky" and folds[0]["auroc_on_choosing_half"]["lucky"] == 1.0
    assert folds[0]["auroc_on_other_half"] < 0.65  # its held-out figure shows the luck
    assert folds[1]["chosen"] == "informative" and folds[1]["auroc_on_other_half"] > 0.8


def test_the_combination_is_fitted_on_one_half_and_scored_on_the_other() -> None:
    rng = np.random.default_rng(2)
    error = rng.random(600) < 0.3
    half = np.arange(600) % 2
    signal = error.astype(np.float64)
    candidates = {"a": signal + rng.normal(size=600), "b": -signal + rng.normal(size=600),
                  "noise": rng.normal(size=600)}
    held_out = combination(candidates, error, half)
    alone = [M.auroc(candidates["a"][half == h], error[half == h]) for h in (0, 1)]
    assert all(both > one + 0.03 for both, one in zip(held_out, alone, strict=True))  # two signals beat one
    few, noise = np.arange(120) % 2, {f"noise {i}": rng.normal(size=120) for i in range(40)}
    chance = combination(noise, rng.random(120) < 0.3, few)  # 40 features on 60 photos: a fit that memorises
    assert all(auroc < 0.7 for auroc in chance), chance  # ... and scores chance on photos it never saw


def test_tied_scores_share_their_average_rank() -> None:
    from evaluation.label_free import _average_ranks, _rank_correlation

    assert _average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    assert _rank_correlation(np.array([0.1, 0.2, 0.2, 0.9]), np.array([1.0, 5.0, 5.0, 7.0])) == pytest.approx(1.0)
