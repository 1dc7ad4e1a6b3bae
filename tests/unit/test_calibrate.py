"""The calibration study's pieces: the temperature fit, ECE, the cross-fit and the S buckets it pools."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.calibrate import (
    CLASSIFY_DEFAULT,
    EMBEDDINGS_DEFAULT,
    bucket_samples,
    cross_fitted_probabilities,
    ece,
    fit_temperature,
)
from service.settings import Settings


def sampled(logits: np.ndarray, seed: int = 0) -> np.ndarray:
    """Labels drawn from softmax(logits): a perfectly calibrated classifier at T = 1."""
    rng = np.random.default_rng(seed)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


def test_fit_temperature_recovers_the_true_one() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(4000, 10))
    labels = sampled(logits)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.06)
    assert fit_temperature(logits * 2.0, labels) == pytest.approx(2.0, rel=0.06)  # over-confident by 2x


def test_ece_is_zero_when_confidence_matches_accuracy_and_counts_the_gap() -> None:
    confidence = np.full(100, 0.75)
    correct = np.arange(100) % 4 != 0  # 75 % right
    assert ece(confidence, correct) == pytest.approx(0.0)
    assert ece(np.full(100, 0.95), correct) == pytest.approx(0.20)
    # two bins, each off by its own gap, weighted by its share
    assert ece(np.r_[np.full(50, 0.55), np.full(50, 0.95)], np.r_[np.ones(50), np.ones(50)] > 0) == \
        pytest.approx(0.5 * 0.45 + 0.5 * 0.05)


def test_cross_fit_uses_the_other_half() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(2000, 5))
    labels = sampled(logits)
    per_s = {1: logits * 3.0}  # over-confident: the fitted T is ≈ 3 on either half
    probs = cross_fitted_probabilities(per_s, [1], 1, labels)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert np.abs(probs - expected).max() < 0.05


def test_buckets_pool_every_s_they_hold() -> None:
    assert bucket_samples("1", 32) == [1]
    assert bucket_samples("2-4", 32) == [2, 3, 4]
    assert bucket_samples("5-16", 32) == list(range(5, 17))
    assert bucket_samples("17+", 32) == list(range(17, 33))


def test_the_tables_default_rows_are_the_settings_defaults() -> None:
    defaults = Settings()
    assert (defaults.default_policy, defaults.default_samples) == EMBEDDINGS_DEFAULT
    assert (defaults.classify_policy, defaults.classify_samples) == CLASSIFY_DEFAULT
