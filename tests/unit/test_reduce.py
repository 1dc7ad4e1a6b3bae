"""Running mean and variance: equal to numpy's however the views are split into chunks."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.reduce import ReduceError, RunningStats, l2_normalize


@pytest.mark.parametrize("chunk", [10, 3, 1, 7])
def test_mean_and_variance_equal_numpy_for_any_chunking(chunk: int) -> None:
    views = np.random.default_rng(0).normal(3.0, 2.0, size=(10, 32)).astype(np.float32)
    stats = RunningStats(32)
    for start in range(0, 10, chunk):
        stats.add(views[start : start + chunk])
    assert stats.count == 10
    np.testing.assert_allclose(stats.mean, views.astype(np.float64).mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.variance(), views.astype(np.float64).var(axis=0, ddof=1), rtol=1e-10)


def test_merge_is_exact_with_a_large_offset() -> None:
    """Chan's update stays exact where a naive sum-of-squares formula loses every digit."""
    views = 1e6 + np.random.default_rng(1).normal(0, 1e-2, size=(64, 8))
    stats = RunningStats(8)
    for part in np.array_split(views, 5):
        stats.add(part)
    np.testing.assert_allclose(stats.variance(), views.var(axis=0, ddof=1), rtol=1e-6)


def test_variance_needs_two_views_and_shapes_are_checked() -> None:
    stats = RunningStats(4)
    stats.add(np.ones((1, 4)))
    with pytest.raises(ReduceError, match="at least 2 views"):
        stats.variance()
    with pytest.raises(ReduceError, match="shape"):
        stats.add(np.ones((2, 5)))


def test_l2_normalize_rows_and_zero_vector() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]])


@pytest.mark.parametrize("chunk", [6, 4, 1])
def test_dispersion_is_one_minus_the_mean_pairwise_cosine_for_any_chunking(chunk: int) -> None:
    views = np.random.default_rng(3).normal(1.0, 1.0, size=(6, 16))
    stats = RunningStats(16)
    for start in range(0, 6, chunk):
        stats.add(views[start : start + chunk])
    unit = l2_normalize(views)
    cosines = unit @ unit.T
    pairwise = cosines[~np.eye(6, dtype=bool)].mean()
    assert stats.dispersion() == pytest.approx(1.0 - pairwise, abs=1e-12)


def test_dispersion_is_zero_for_agreeing_views_and_needs_two() -> None:
    stats = RunningStats(4)
    stats.add(np.array([[1.0, 2.0, 0.0, 0.0]]))
    with pytest.raises(ReduceError, match="2 views"):
        stats.dispersion()
    stats.add(np.array([[3.0, 6.0, 0.0, 0.0]]))  # the same direction, another length
    assert stats.dispersion() == pytest.approx(0.0, abs=1e-12)
    stats.add(np.array([[-1.0, -2.0, 0.0, 0.0]]))  # the opposite direction
    assert stats.dispersion() == pytest.approx(1.0 - (1 - 1 - 1) / 3, abs=1e-12)


def test_dispersion_of_identical_views_is_exactly_zero_never_negative() -> None:
    views = np.tile(np.random.default_rng(3).normal(size=(1, 1280)), (7, 1))
    for scale in (1.0, 1e-3, 1e3, 0.1):
        stats = RunningStats(1280)
        stats.add(views * scale)
        assert 0.0 <= stats.dispersion() <= 2.0
        assert stats.dispersion() == pytest.approx(0.0, abs=1e-12)
    assert stats.dispersion() >= 0.0


def test_a_zero_norm_view_counts_as_cosine_zero_with_every_other() -> None:
    """The stated rule: a view with no direction neither agrees nor disagrees (cosine 0)."""
    views = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    stats = RunningStats(2)
    stats.add(views)
    # ordered pairs: (0,1),(1,0) cosine 1; the four pairs with the zero view cosine 0 → mean 2/6
    assert stats.dispersion() == pytest.approx(1.0 - 2 / 6, abs=1e-12)
    stats = RunningStats(2)
    stats.add(np.zeros((4, 2)))
    assert stats.dispersion() == pytest.approx(1.0, abs=1e-12)
    opposite = RunningStats(2)
    opposite.add(np.array([[1.0, 0.0], [-1.0, 0.0]]))
    assert opposite.dispersion() == pytest.approx(2.0, abs=1e-12)
