"""Per-image statistics over views: running mean and unbiased variance, merged exactly.

Views of one image may arrive in several chunks (a request larger than a batch). Each chunk's
(count, mean, M2) is merged into the running total with Chan et al.'s parallel update, in float64,
so the result is the same however S was split.
"""

from __future__ import annotations

import numpy as np


class ReduceError(ValueError):
    """A statistic was asked for that the views cannot give (e.g. variance of one view)."""


class RunningStats:
    """Mean and M2 (sum of squared deviations) of the view embeddings seen so far, per dimension."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)
        self.unit_sum = np.zeros(dim, dtype=np.float64)  # Σ of the L2-normalised views, for `dispersion`
        self.unit_sq = 0.0  # Σ of their squared norms: 1 per view, 0 per zero-norm view

    def add(self, views: np.ndarray) -> None:
        """Merge a chunk of view embeddings, shape (n, dim)."""
        views = np.asarray(views, dtype=np.float64)
        if views.ndim != 2 or views.shape[1] != self.mean.shape[0]:
            raise ReduceError(f"expected views of shape (n, {self.mean.shape[0]}), got {views.shape}")
        n = views.shape[0]
        if n == 0:
            return
        chunk_mean = views.mean(axis=0)
        chunk_m2 = ((views - chunk_mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = chunk_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + chunk_m2 + delta**2 * (self.count * n / total)
        units = l2_normalize(views)
        self.unit_sum = self.unit_sum + units.sum(axis=0)
        self.unit_sq += float(np.square(units).sum())
        self.count = total

    def variance(self) -> np.ndarray:
        """Unbiased per-dimension variance (S-1 denominator); undefined for a single view."""
        if self.count < 2:
            raise ReduceError("variance needs at least 2 views (samples >= 2)")
        variance: np.ndarray = self.m2 / (self.count - 1)
        return variance

    def dispersion(self) -> float:
        """1 − the mean pairwise cosine of the views: 0 when they agree; see `dispersion`."""
        if self.count < 2:
            raise ReduceError("dispersion needs at least 2 views (samples >= 2)")
        return float(dispersion(self.unit_sum, self.count, self.unit_sq))


def dispersion(unit_sum: np.ndarray, count: int, unit_sq: float | np.ndarray | None = None) -> np.ndarray:
    """1 − mean pairwise cosine of `count` unit vectors whose sum is `unit_sum` (last axis), in [0, 2].

    Σ_{s≠t} u_s·u_t = ‖Σ u‖² − Σ‖u_s‖², so the mean over the S(S−1) ordered pairs needs only the running
    sums; `unit_sq` = Σ‖u_s‖² (default `count`: every view has norm 1). A zero-norm view has no direction:
    its cosine with any view counts as 0 (it stays a zero vector in `unit_sum` and adds 0 to `unit_sq`).
    Clamped to [0, 2], the range of 1 − cos, so rounding cannot give −4e-16 for identical views.
    A label-free uncertainty score (docs/quality.md: best of those tried for flagging retrieval misses).
    """
    squares = count if unit_sq is None else unit_sq
    pairwise = (np.square(unit_sum).sum(axis=-1) - squares) / (count * (count - 1))
    result: np.ndarray = np.clip(1.0 - pairwise, 0.0, 2.0)
    return result


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Each row (or the vector) divided by its L2 norm; zero vectors stay zero."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    normalized: np.ndarray = x / np.maximum(norm, eps)
    return normalized
