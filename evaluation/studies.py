"""The four studies of the quality issue, each a function from per-view embeddings to a JSON-able dict.

Every comparison is paired: the same photos, the same seeds, method B minus the central crop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evaluation import metrics as M
from service.core.policies import CenterPolicy, CropFlipPolicy, MultiscalePolicy, Policy
from service.core.reduce import dispersion

ViewBank = Callable[[Policy, int], np.ndarray]  # (policy, S_max) → (N, S_max, dim) per-view embeddings
SQRT2 = math.sqrt(2)
PCA_DIMS = 64  # reference principal directions used by the whitened scores


@dataclass(frozen=True)
class StudyConfig:
    seed: int = 0
    classify_samples: tuple[int, ...] = (2, 4, 10, 32)
    default_scale: tuple[float, float] = (0.25, 1.0)
    scale_ranges: tuple[tuple[float, float], ...] = ((0.08, 1.0), (0.25, 1.0), (0.5, 1.0), (0.7, 1.0))
    sweep_samples: int = 10  # S_max for the scale ranges other than the default (cost)
    alphas: tuple[float, ...] = tuple(round(0.1 * i, 2) for i in range(16))  # 0 … 1.5
    retrieval_samples: tuple[int, ...] = (1, 2, 3, 8)
    # The default multiscale set and one with an upscaled (√2 · 224 = 317 px) input first; prefixes of
    # the second give √2 alone, (√2, 1) and (√2, 1, 1/√2).
    scale_sets: tuple[tuple[float, ...], ...] = ((1.0, 1 / SQRT2, 0.5), (SQRT2, 1.0, 1 / SQRT2, 0.5))
    uncertainty_samples: tuple[int, ...] = (4, 10, 32)
    convergence_images: int = 50
    convergence_reference: int = 128
    bootstrap: int = 2000
    extra: dict[str, Any] = field(default_factory=dict)


def pixel_cost(policy: Policy, samples: int, input_size: int) -> float:
    """Pixels forwarded, in 224-px-view equivalents: Σ over views of (size / input_size)²."""
    if isinstance(policy, MultiscalePolicy):
        sizes = [size for size, _ in policy.sizes(samples, input_size)]
        return float(sum((size / input_size) ** 2 for size in sizes))
    return float(samples)


def policy_label(policy: Policy) -> str:
    if isinstance(policy, CropFlipPolicy):
        return f"crop_flip({policy.scale[0]:g},{policy.scale[1]:g})"
    if isinstance(policy, MultiscalePolicy):
        return "multiscale(" + ",".join(_scale_name(s) for s in policy.scales) + ")"
    return "center"


def _scale_name(scale: float) -> str:
    for value, name in ((SQRT2, "√2"), (1 / SQRT2, "1/√2")):
        if abs(scale - value) < 1e-9:
            return name
    return f"{scale:g}"


# ---- 1. classification ------------------------------------------------------------------------

def _logits(embeddings: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    out: np.ndarray = embeddings @ weight.T + bias
    return out


def _scores(top1: np.ndarray, top5: np.ndarray, nll: np.ndarray) -> dict[str, float]:
    return {"top1": float(top1.mean()), "top5": float(top5.mean()), "nll": float(nll.mean())}


def classification(bank: ViewBank, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                   config: StudyConfig, input_size: int) -> dict[str, Any]:
    """Top-1/top-5/NLL of softmax(θᵀ mean) (MeTTA, eq. 7) and of mean softmax (classic TTA, eq. 6)."""
    center_logits = _logits(bank(CenterPolicy(), 1)[:, 0], weight, bias)
    center = {"top1": M.topk_correct(center_logits, labels, 1), "top5": M.topk_correct(center_logits, labels, 5),
              "nll": M.nll_of_logits(center_logits, labels)}
    rows: list[dict[str, Any]] = [{"policy": "center", "method": "center", "S": 1, "forwards": 1,
                                   "pixels": 1.0, **_scores(center["top1"], center["top5"], center["nll"])}]

    def compare(top1: np.ndarray, top5: np.ndarray, nll: np.ndarray) -> dict[str, Any]:
        return {"top1": M.mcnemar_exact(center["top1"], top1), "top5": M.mcnemar_exact(center["top5"], top5),
                "nll": M.paired_bootstrap(center["nll"], nll, resamples=config.bootstrap, seed=config.seed)}

    policies: list[tuple[Policy, int]] = [
        (CropFlipPolicy(scale=scale), max(config.classify_samples) if scale == config.default_scale
         else min(config.sweep_samples, max(config.classify_samples)))
        for scale in config.scale_ranges]
    policies.append((MultiscalePolicy(), max(config.classify_samples)))
    interpolation: dict[str, Any] = {}
    for policy, s_max in policies:
        views = bank(policy, s_max)
        view_logits = _logits(views, weight, bias)  # (N, S, classes): θᵀ is linear, so θᵀ mean = mean θᵀ
        view_logp = M.log_softmax(view_logits)
        for samples in [s for s in config.classify_samples if s <= s_max]:
            metta = view_logits[:, :samples].mean(axis=1)
            tta = np.exp(view_logp[:, :samples]).mean(axis=1)
            for method, scores, nll in (("metta", metta, M.nll_of_logits(metta, labels)),
                                        ("tta", tta, M.nll_of_probs(tta, labels))):
                top1, top5 = M.topk_correct(scores, labels, 1), M.topk_correct(scores, labels, 5)
                rows.append({"policy": policy_label(policy), "method": method, "S": samples, "forwards": samples,
                             "pixels": pixel_cost(policy, samples, input_size), **_scores(top1, top5, nll),
                             "vs_center": compare(top1, top5, nll)})
        if isinstance(policy, CropFlipPolicy) and policy.scale == config.default_scale:
            interpolation = interpolate(view_logits, center_logits, labels, config.alphas)
            interpolation["policy"], interpolation["S"] = policy_label(policy), s_max
    return {"rows": rows, "interpolation": interpolation, "images": len(labels)}


def interpolate(view_logits: np.ndarray, center_logits: np.ndarray, labels: np.ndarray,
                alphas: Sequence[float]) -> dict[str, Any]:
    """Paper Fig. 3: NLL and top-1 along (1-α)·mean + α·y, y = the central crop or each single view.

    The head is affine, so θᵀ((1-α)m + αy) + b = (1-α)(θᵀm + b) + α(θᵀy + b): logits interpolate too.
    """
    mean_logits = view_logits.mean(axis=1)
    n, s, classes = view_logits.shape
    repeated_labels = np.repeat(labels, s)
    out: dict[str, Any] = {"alphas": list(alphas), "center": {"nll": [], "top1": []},
                           "single_views": {"nll": [], "top1": []}}
    for alpha in alphas:
        to_center = (1 - alpha) * mean_logits + alpha * center_logits
        out["center"]["nll"].append(float(M.nll_of_logits(to_center, labels).mean()))
        out["center"]["top1"].append(float(M.topk_correct(to_center, labels, 1).mean()))
        to_views = ((1 - alpha) * mean_logits[:, None] + alpha * view_logits).reshape(n * s, classes)
        out["single_views"]["nll"].append(float(M.nll_of_logits(to_views, repeated_labels).mean()))
        out["single_views"]["top1"].append(float(M.topk_correct(to_views, repeated_labels, 1).mean()))
    return out


# ---- 2. retrieval -----------------------------------------------------------------------------

def mean_embedding(views: np.ndarray, view_normalize: bool) -> np.ndarray:
    """The service's mean over views (optionally of L2-normalised views); the caller L2-normalises after."""
    mean: np.ndarray = (M.l2_rows(views) if view_normalize else views).mean(axis=1)
    return mean


def retrieval(photo_bank: ViewBank, query_bank: ViewBank, config: StudyConfig, input_size: int) -> dict[str, Any]:
    """Near-duplicate retrieval: each edited query should find its own photo among all photos."""
    configs: list[tuple[Policy, int, int]] = [(CenterPolicy(), 1, 1)]  # (policy, S, S_max of its view bank)
    s_max = max(config.retrieval_samples)
    crop_flip = CropFlipPolicy(scale=config.default_scale)
    configs += [(crop_flip, s, s_max) for s in config.retrieval_samples]
    for scales in config.scale_sets:
        bank_size = max(s_max, len(scales)) if scales == config.scale_sets[0] else len(scales)
        sizes = sorted(set(config.retrieval_samples) | {len(scales)}) if scales == config.scale_sets[0] \
            else range(1, len(scales) + 1)
        configs += [(MultiscalePolicy(scales=scales), s, bank_size) for s in sizes if s <= bank_size]
    queries_count = len(query_bank(CenterPolicy(), 1))
    relevant = np.eye(queries_count, len(photo_bank(CenterPolicy(), 1)), dtype=bool)
    baseline: dict[str, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    per_query: dict[str, np.ndarray] = {}
    for policy, samples, bank_size in configs:
        photo_views = photo_bank(policy, bank_size)[:, :samples]
        query_views = query_bank(policy, bank_size)[:, :samples]
        shown = policy
        if isinstance(policy, MultiscalePolicy) and samples < len(policy.scales):
            shown = MultiscalePolicy(scales=policy.scales[:samples])  # a prefix is itself a scale set
        for view_normalize in ((False,) if samples == 1 else (False, True)):
            result = M.retrieval_per_query(mean_embedding(query_views, view_normalize),
                                           mean_embedding(photo_views, view_normalize), relevant)
            if not baseline:
                baseline = result
            row: dict[str, Any] = {"policy": policy_label(shown), "S": samples, "view_normalize": view_normalize,
                                   "forwards": samples, "pixels": pixel_cost(policy, samples, input_size),
                                   "recall_at_1": float(result["hit_at_1"].mean()), "map": float(result["ap"].mean())}
            if result is not baseline:
                row["vs_center"] = {
                    "recall_at_1": M.mcnemar_exact(baseline["hit_at_1"], result["hit_at_1"]),
                    "recall_at_1_ci": M.paired_bootstrap(baseline["hit_at_1"], result["hit_at_1"],
                                                         resamples=config.bootstrap, seed=config.seed),
                    "map": M.paired_bootstrap(baseline["ap"], result["ap"], resamples=config.bootstrap,
                                              seed=config.seed)}
            rows.append(row)
            per_query[f"{row['policy']}|S={samples}|vn={view_normalize}"] = result["hit_at_1"]
    return {"rows": rows, "queries": queries_count, "per_query_hits": per_query}


# ---- 3. uncertainty ---------------------------------------------------------------------------

def dispersion_scores(views: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
    """Label-free uncertainty scores from S ≥ 2 views (N, S, dim); higher means less certain.

    `reference` is (R, dim): central-crop embeddings of other photos, for per-dimension scales.
    """
    mean = views.mean(axis=1)
    variance = views.var(axis=1, ddof=1)
    unit = M.l2_rows(views)
    cos_to_mean = np.einsum("nsd,nd->ns", unit, M.l2_rows(mean))
    unit_mean = unit.mean(axis=1)
    s = views.shape[1]
    ref_var = reference.var(axis=0, ddof=1) + 1e-6
    # The reference's top principal directions, whitened: spread along directions that tell photos apart.
    ref_mean = reference.mean(axis=0)
    _, singular, basis = np.linalg.svd(reference - ref_mean, full_matrices=False)
    k = min(PCA_DIMS, len(singular) - 1)
    eigen = singular[:k] ** 2 / (len(reference) - 1)
    projected = (views - mean[:, None]) @ basis[:k].T  # (N, S, k)
    whitened_var = (np.square(projected).sum(axis=1) / (s - 1) / eigen).mean(axis=1)
    spread = np.sqrt(variance.sum(axis=1))
    nearest = np.sqrt(np.maximum(
        np.square(mean).sum(1)[:, None] - 2 * mean @ reference.T + np.square(reference).sum(1)[None], 0)).min(axis=1)
    return {
        "pca_whitened_var": whitened_var,
        "mean_mahalanobis": (np.square((mean - ref_mean) @ basis[:k].T) / eigen).sum(axis=1),
        "spread_over_nn_distance": spread / np.maximum(nearest, 1e-12),
        "var_over_sq_norm": variance.sum(axis=1) / np.square(mean).sum(axis=1),
        "one_minus_cos_to_mean": 1 - cos_to_mean.mean(axis=1),
        "one_minus_pairwise_cos": dispersion(unit.sum(axis=1), s),  # the service's `dispersion`
        "one_minus_unit_mean_norm": 1 - np.linalg.norm(unit_mean, axis=1),
        "var_over_ref_var": (variance / ref_var).mean(axis=1),
        "neg_mean_norm": -np.linalg.norm(mean, axis=1),
    }


def cross_fitted_scores(views: np.ndarray, reference: np.ndarray, folds: int = 2) -> dict[str, np.ndarray]:
    """`dispersion_scores` where each image's reference statistics come from the other folds' photos."""
    fold = np.arange(len(views)) % folds
    out: dict[str, np.ndarray] = {}
    for f in range(folds):
        part = dispersion_scores(views[fold == f], reference[fold != f])
        for name, values in part.items():
            out.setdefault(name, np.empty(len(views)))[fold == f] = values
    return out


def uncertainty(bank: ViewBank, labels: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None,
                config: StudyConfig) -> dict[str, Any]:
    """AUROC of each score for predicting a top-1 error of the MeTTA prediction at the same S."""
    policy = CropFlipPolicy(scale=config.default_scale)
    all_views = bank(policy, max(config.uncertainty_samples))
    reference = bank(CenterPolicy(), 1)[:, 0]
    rows = []
    for samples in config.uncertainty_samples:
        views = all_views[:, :samples]
        scores = cross_fitted_scores(views, reference)
        row: dict[str, Any] = {"policy": policy_label(policy), "S": samples,
                               "target": f"MeTTA top-1 error at S={samples}"}
        if weight is not None and bias is not None:
            view_logits = _logits(views, weight, bias)
            mean_logits = view_logits.mean(axis=1)
            predicted = mean_logits.argmax(axis=1)
            error = predicted != labels
            scores["max_softmax"] = -M.softmax(mean_logits).max(axis=1)
            scores["disagreement"] = (view_logits.argmax(axis=2) != predicted[:, None]).mean(axis=1)
            row["errors"] = int(error.sum())
            row["auroc"] = {name: _auroc_with_ci(values, error, config) for name, values in scores.items()}
        rows.append(row)
    # Dispersion across input resolutions (one view per multiscale size) as a flag for the central
    # crop's own errors: what a service returning center or multiscale embeddings could report.
    multiscale = MultiscalePolicy()
    views = bank(multiscale, len(multiscale.scales))
    scores = cross_fitted_scores(views, reference)
    row = {"policy": policy_label(multiscale), "S": len(multiscale.scales), "target": "central-crop top-1 error"}
    if weight is not None and bias is not None:
        center_logits = _logits(reference, weight, bias)
        predicted = center_logits.argmax(axis=1)
        error = predicted != labels
        scores["max_softmax"] = -M.softmax(center_logits).max(axis=1)
        scores["disagreement"] = (_logits(views, weight, bias).argmax(axis=2) != predicted[:, None]).mean(axis=1)
        row["errors"] = int(error.sum())
        row["auroc"] = {name: _auroc_with_ci(values, error, config) for name, values in scores.items()}
    rows.append(row)
    return {"rows": rows, "images": len(labels)}


def _auroc_with_ci(scores: np.ndarray, positive: np.ndarray, config: StudyConfig) -> dict[str, float]:
    rng = np.random.default_rng(config.seed)
    index = rng.integers(0, len(scores), size=(min(config.bootstrap, 1000), len(scores)))
    boot = [M.auroc(scores[i], positive[i]) for i in index]
    return {"auroc": M.auroc(scores, positive), "lo": float(np.nanquantile(boot, 0.025)),
            "hi": float(np.nanquantile(boot, 0.975))}


def retrieval_uncertainty(photo_bank: ViewBank, query_bank: ViewBank, hits: dict[str, np.ndarray],
                          config: StudyConfig) -> list[dict[str, Any]]:
    """Does a query's own dispersion flag the queries whose nearest photo is the wrong one?"""
    reference = photo_bank(CenterPolicy(), 1)[:, 0]  # the database's central crops: no query label used
    rows = []
    for policy, samples, bank_size in ((CropFlipPolicy(scale=config.default_scale), max(config.retrieval_samples),
                                        max(config.retrieval_samples)),
                                       (MultiscalePolicy(scales=config.scale_sets[0]), len(config.scale_sets[0]),
                                        max(config.retrieval_samples))):
        key = f"{policy_label(policy)}|S={samples}|vn=False"
        if key not in hits:
            continue
        miss = ~hits[key]
        scores = dispersion_scores(query_bank(policy, bank_size)[:, :samples], reference)
        rows.append({"policy": policy_label(policy), "S": samples, "misses": int(miss.sum()),
                     "auroc": {name: _auroc_with_ci(values, miss, config) for name, values in scores.items()}})
    return rows


# ---- 4. convergence ---------------------------------------------------------------------------

def convergence(bank: ViewBank, reference_bank: ViewBank, config: StudyConfig) -> dict[str, Any]:
    """Cosine of the S-view mean to an independent 128-view mean (another seed) of the same photo."""
    policy = CropFlipPolicy(scale=config.default_scale)
    s_max = max(config.classify_samples)
    views = bank(policy, s_max)[: config.convergence_images]
    reference = M.l2_rows(reference_bank(policy, config.convergence_reference).mean(axis=1))
    center = bank(CenterPolicy(), 1)[: config.convergence_images, 0]
    sizes = [s for s in (1, 2, 4, 8, 16, 32, 64) if s <= s_max]
    rows = []
    for samples in sizes:
        cos = np.sum(M.l2_rows(views[:, :samples].mean(axis=1)) * reference, axis=1)
        rows.append({"S": samples, "median": float(np.median(cos)), "p5": float(np.quantile(cos, 0.05)),
                     "mean": float(cos.mean())})
    center_cos = np.sum(M.l2_rows(center) * reference, axis=1)
    return {"policy": policy_label(policy), "images": len(views), "reference_views": config.convergence_reference,
            "rows": rows, "center": {"median": float(np.median(center_cos)),
                                     "p5": float(np.quantile(center_cos, 0.05))}}
