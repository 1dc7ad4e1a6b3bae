"""Metrics, per image where a paired comparison needs them, and the paired tests.

Methods are compared on the same images: McNemar's exact test for top-1 (only the discordant pairs
carry information) and a paired bootstrap over images for mean differences (NLL, recall, AP).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.exp(log_softmax(logits))
    return out


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per image: is the label among the k highest scores (logits or probabilities)?"""
    top = np.argpartition(-scores, kth=k - 1, axis=-1)[:, :k]
    correct: np.ndarray = (top == labels[:, None]).any(axis=1)
    return correct


def nll_of_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per image: −log softmax(logits)[label]."""
    out: np.ndarray = -log_softmax(logits)[np.arange(len(labels)), labels]
    return out


def nll_of_probs(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Per image: −log p[label] for averaged probabilities (classic TTA)."""
    out: np.ndarray = -np.log(np.maximum(probs[np.arange(len(labels)), labels], eps))
    return out


def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> dict[str, float]:
    """Two-sided exact McNemar test: under H0 the discordant pairs split Binomial(n, 1/2).

    Returns the counts only A got right (`a_only`), only B got right (`b_only`) and the p-value.
    """
    a_only = int(np.sum(a_correct & ~b_correct))
    b_only = int(np.sum(~a_correct & b_correct))
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p": 1.0}
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1))  # exact integers: no underflow
    p = min(1.0, 2 * tail / 2**n)
    return {"a_only": a_only, "b_only": b_only, "p": p}


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper–Pearson) interval of a binomial proportion: the p whose tail probabilities of the
    observed count are (1 − level)/2, found by bisection on the exact binomial sums (no scipy needed)."""
    if not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    tail = (1 - level) / 2

    def at_least(p: float) -> float:  # P(X >= successes | p), increasing in p
        return sum(_binomial_pmf(i, trials, p) for i in range(successes, trials + 1))

    def at_most(p: float) -> float:  # P(X <= successes | p), decreasing in p
        return sum(_binomial_pmf(i, trials, p) for i in range(successes + 1))

    lo = 0.0 if successes == 0 else _bisect(lambda p: at_least(p) >= tail)
    hi = 1.0 if successes == trials else _bisect(lambda p: at_most(p) < tail)
    return lo, hi


def _binomial_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return float(k == (0 if p <= 0.0 else n))
    log_pmf = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) \
        + (n - k) * math.log1p(-p)
    return math.exp(log_pmf)


def _bisect(past: Callable[[float], bool]) -> float:
    """The boundary in [0, 1] where a monotone condition turns true, to ~1e-12."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if past(mid):
            high = mid
        else:
            low = mid
    return (low + high) / 2


def mcnemar_interval(a_correct: np.ndarray, b_correct: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Accuracy of B minus A on the same images, with McNemar's exact interval and test.

    Given the n discordant images, the number only B got right is Binomial(n, π); the difference is
    n(2π − 1)/N, so the Clopper–Pearson interval of π gives an exact (conditional) interval of the
    difference, which excludes 0 exactly when the two-sided exact test has p < 1 − level.
    """
    test = mcnemar_exact(a_correct, b_correct)
    total, discordant = len(a_correct), test["a_only"] + test["b_only"]
    if discordant == 0:
        return {**test, "diff": 0.0, "lo": 0.0, "hi": 0.0}
    lo, hi = clopper_pearson(int(test["b_only"]), int(discordant), level)
    return {**test, "diff": (test["b_only"] - test["a_only"]) / total,
            "lo": discordant * (2 * lo - 1) / total, "hi": discordant * (2 * hi - 1) / total}


# A statistic of a paired bootstrap: per-image arrays and an (R, N) matrix of resampled image indices → R values.
Statistic = Callable[[Sequence[np.ndarray], np.ndarray], np.ndarray]


def mean_statistic(arrays: Sequence[np.ndarray], index: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.asarray(arrays[0], dtype=np.float64)[index].mean(axis=1)
    return out


def ece_statistic(arrays: Sequence[np.ndarray], index: np.ndarray, bins: int = 15) -> np.ndarray:
    """Expected calibration error of (max_probability, correct) on each resample: Σ_bins (share of images) ×
    |accuracy − mean confidence|, equal-width bins (a bin's right edge inside it), all resamples at once."""
    confidence, correct = np.asarray(arrays[0], dtype=np.float64), np.asarray(arrays[1], dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    resamples, count = index.shape
    slot = (which[index] + bins * np.arange(resamples)[:, None]).ravel()  # (resample, bin) → one flat slot
    gap = np.bincount(slot, weights=(correct[index] - confidence[index]).ravel(), minlength=resamples * bins)
    out: np.ndarray = np.abs(gap.reshape(resamples, bins)).sum(axis=1) / count
    return out


def auroc_statistic(arrays: Sequence[np.ndarray], index: np.ndarray) -> np.ndarray:
    """`auroc(score, positive)` on each resample (ties count 1/2): every positive against every negative."""
    score, positive = np.asarray(arrays[0], dtype=np.float64), np.asarray(arrays[1], dtype=bool)
    out = np.empty(len(index))
    for r, rows in enumerate(index):
        s, p = score[rows], positive[rows]
        pos, neg = s[p][:, None], s[~p][None, :]
        out[r] = ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / pos.size / neg.size if p.any() and (~p).any() \
            else np.nan
    return out


def bootstrap_difference(statistic: Statistic, a: Sequence[np.ndarray], b: Sequence[np.ndarray], *,
                         resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """statistic(B) − statistic(A) on the same images, with a percentile interval from resampling images
    (each resample takes both methods' values of the same images: the pairs stay together)."""
    count = len(a[0])
    rng = np.random.default_rng(seed)
    index = rng.integers(0, count, size=(resamples, count))
    everything = np.arange(count)[None, :]
    diffs = statistic(b, index) - statistic(a, index)
    tail = (1 - level) / 2
    return {"diff": float((statistic(b, everything) - statistic(a, everything))[0]),
            "lo": float(np.nanquantile(diffs, tail)), "hi": float(np.nanquantile(diffs, 1 - tail))}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of b − a over images, with a percentile CI from resampling images (pairs kept together)."""
    return bootstrap_difference(mean_statistic, (a,), (b,), resamples=resamples, seed=seed, level=level)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2 (Mann–Whitney U)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average ranks (1-based) over runs of tied scores
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def l2_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    out: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    return out


def retrieval_per_query(queries: np.ndarray, database: np.ndarray, relevant: np.ndarray) -> dict[str, np.ndarray]:
    """Cosine retrieval: per query, is the top hit relevant (recall@1) and its average precision.

    `relevant[q, d]` marks the database items that count as hits for query q. Ties in similarity
    are broken pessimistically (a relevant item ranks after every equally similar irrelevant one).
    """
    sim = l2_rows(queries) @ l2_rows(database).T
    relevant = np.asarray(relevant, dtype=bool)
    hit_at_1 = np.empty(len(queries), dtype=bool)
    ap = np.empty(len(queries), dtype=np.float64)
    for q in range(len(queries)):
        # Sort by similarity descending; among ties, irrelevant items first (pessimistic).
        order = np.lexsort((relevant[q], -sim[q]))
        hits = relevant[q][order]
        hit_at_1[q] = bool(hits[0])
        ranks = np.flatnonzero(hits) + 1
        ap[q] = float(np.mean(np.arange(1, len(ranks) + 1) / ranks)) if len(ranks) else 0.0
    return {"hit_at_1": hit_at_1, "ap": ap}


# ---- a method against the central crop ------------------------------------------------------------

@dataclass(frozen=True)
class Predictions:
    """A classifier's calibrated predictions on some images, per image."""

    correct: np.ndarray  # top-1 right (the temperature does not change the argmax)
    nll: np.ndarray  # −log p[label] at the temperature
    max_probability: np.ndarray


def prediction_figures(p: Predictions) -> dict[str, float]:
    everything = np.arange(len(p.correct))[None, :]
    return {"top1": float(p.correct.mean()), "nll": float(p.nll.mean()),
            "ece": float(ece_statistic((p.max_probability, p.correct), everything)[0]),
            "auroc": float(auroc_statistic((-p.max_probability, ~p.correct), everything)[0])}


def versus(center: Predictions, other: Predictions, *, bootstrap: int = 2000,
           seed: int = 0) -> dict[str, dict[str, float]]:
    """other − center on the same images: top-1 with McNemar's exact interval (and a bootstrap one), NLL, ECE
    and the AUROC of max_probability for a top-1 error with paired-bootstrap intervals (95 %)."""
    def difference(statistic: Statistic, a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> dict[str, float]:
        return bootstrap_difference(statistic, a, b, resamples=bootstrap, seed=seed)

    return {"top1": mcnemar_interval(center.correct, other.correct),
            "top1_bootstrap": difference(mean_statistic, (center.correct,), (other.correct,)),
            "nll": difference(mean_statistic, (center.nll,), (other.nll,)),
            "ece": difference(ece_statistic, (center.max_probability, center.correct),
                              (other.max_probability, other.correct)),
            "auroc": difference(auroc_statistic, (-center.max_probability, ~center.correct),
                                (-other.max_probability, ~other.correct))}
