"""Metrics, per image where a paired comparison needs them, and the paired tests.

Methods are compared on the same images: McNemar's exact test for top-1 (only the discordant pairs
carry information) and a paired bootstrap over images for mean differences (NLL, recall, AP).
"""

from __future__ import annotations

import math

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


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of b − a over images, with a percentile CI from resampling images (pairs kept together)."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[index].mean(axis=1)
    tail = (1 - level) / 2
    return {"diff": float(diff.mean()), "lo": float(np.quantile(means, tail)),
            "hi": float(np.quantile(means, 1 - tail))}


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
