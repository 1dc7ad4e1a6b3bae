"""`python -m evaluation.label_free`: which head-free score flags /v1/classify's errors (issue 14).

Positives are the top-1 errors of /v1/classify's default (crop_flip S=10, the model's head on the mean
embedding); the head defines them and is used for nothing else. Every candidate is computed from the
views alone:

- *pooled*: from the S view embeddings or their mean m (dispersion, norm, how m's mass spreads over its
  features);
- *spatial*: from the backbone's feature map of the central crop before pooling (where the image's
  features sit and how they agree across the image) — the same forward, one step earlier;
- *combination*: a logistic regression over all of them, fitted on one half and scored on the other.

The photos are split in two halves. On each half the best candidate is chosen by AUROC, then reported on
the other half: the held-out figure is the one that counts (the goal is ≥ 0.75). Nothing here is fitted on
the half it is reported on.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation import metrics as M
from evaluation.calibrate import S_MAX, halves
from evaluation.cli import DEFAULT_DATA
from evaluation.data import decode_file, load_samples
from evaluation.views import cached_per_view
from service.core.embedding import EmbedOptions, ImageJob
from service.core.policies import CenterPolicy, make_policy
from service.core.reduce import dispersion
from service.core.render import render_view
from service.core.uncertainty import label_free_uncertainty

log = logging.getLogger("metta.label_free")
# The views and errors the (retired) study was run on: /v1/classify's default at the time, crop_flip S=10.
STUDY_POLICY = make_policy("crop_flip")
STUDY_S = 10
SHIPPED = "participation (l1/l2)"  # the service's `label_free_uncertainty`


def _norm(x: np.ndarray, p: float) -> np.ndarray:
    out: np.ndarray = (np.abs(x) ** p).sum(axis=-1) ** (1 / p)
    return out


def activation_entropy(mean: np.ndarray) -> np.ndarray:
    """Entropy of max(m, 0) / Σ max(m, 0) per row."""
    positive = np.maximum(mean, 0.0)
    p = positive / np.maximum(positive.sum(axis=1, keepdims=True), 1e-300)
    out: np.ndarray = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
    return out


def pooled_candidates(views: np.ndarray) -> dict[str, np.ndarray]:
    """Head-free scores from S views (N, S, dim); higher = less certain."""
    mean = views.mean(axis=1)
    norm = np.linalg.norm(mean, axis=1)
    spread = dispersion(M.l2_rows(views).sum(axis=1), views.shape[1])
    descending = -np.sort(-mean, axis=1)
    standardized = (mean - mean.mean(axis=1, keepdims=True)) / mean.std(axis=1, keepdims=True)
    return {
        "dispersion": spread,
        "mean_norm": norm,
        "negative_mean_norm": -norm,
        "dispersion × mean_norm": spread * norm,
        "activation entropy": activation_entropy(mean),
        SHIPPED: np.asarray(label_free_uncertainty(mean)),
        "l2/l4": _norm(mean, 2) / _norm(mean, 4),
        "l1/l∞": _norm(mean, 1) / np.abs(mean).max(axis=1),
        "−(top-20 share)": -descending[:, :20].sum(axis=1) / descending.sum(axis=1),
        "−(top-50 share)": -descending[:, :50].sum(axis=1) / descending.sum(axis=1),
        "−skewness": -(standardized ** 3).mean(axis=1),
        "−kurtosis": -(standardized ** 4).mean(axis=1),
        "share of features above the mean": (mean > mean.mean(axis=1, keepdims=True)).mean(axis=1),
    }


def spatial_candidates(maps: np.ndarray) -> dict[str, np.ndarray]:
    """Head-free scores from pre-pooling feature maps (N, C, H, W) of one view; higher = less certain."""
    cells = maps.reshape(maps.shape[0], maps.shape[1], -1).transpose(0, 2, 1)  # (N, H·W, C)
    pooled = cells.mean(axis=1)
    energy = np.linalg.norm(cells, axis=2)
    share = energy / np.maximum(energy.sum(axis=1, keepdims=True), 1e-300)  # where the activation sits
    cosine = (M.l2_rows(cells) * M.l2_rows(pooled)[:, None]).sum(axis=2)  # each cell against the whole image
    peak = cells.max(axis=1)
    cell_participation = _norm(cells, 1) / np.maximum(_norm(cells, 2), 1e-300)
    return {
        "spatial entropy of activation": -(share * np.log(np.maximum(share, 1e-300))).sum(axis=1),
        "1 − mean cos(cell, image)": 1 - cosine.mean(axis=1),
        "1 − energy-weighted cos(cell, image)": 1 - (cosine * share).sum(axis=1),
        "cos(max-pool, mean-pool)": (M.l2_rows(peak) * M.l2_rows(pooled)).sum(axis=1),
        "‖mean-pool‖ / ‖max-pool‖": np.linalg.norm(pooled, axis=1) / np.linalg.norm(peak, axis=1),
        "energy-weighted cell l1/l2": (cell_participation * share).sum(axis=1),
    }


def _logistic(train: np.ndarray, positive: np.ndarray, l2: float = 10.0, steps: int = 3000) -> np.ndarray:
    """Weights (standardised features) of an L2-regularised logistic regression, by gradient descent."""
    weights = np.zeros(train.shape[1] + 1)
    design = np.hstack([train, np.ones((len(train), 1))])
    target = positive.astype(np.float64)
    for _ in range(steps):
        predicted = 1 / (1 + np.exp(-design @ weights))
        gradient = design.T @ (predicted - target) / len(target)
        gradient[:-1] += l2 * weights[:-1] / len(target)
        weights -= 0.5 * gradient
    return weights


def held_out_choice(candidates: dict[str, np.ndarray], error: np.ndarray, half: np.ndarray) -> dict[str, Any]:
    """Per fold: AUROCs on the choosing half, the best of them, and its AUROC on the other half."""
    folds = []
    for choose_on in (0, 1):
        on_a = {name: M.auroc(score[half == choose_on], error[half == choose_on])
                for name, score in candidates.items()}
        best = max(on_a, key=lambda name: on_a[name])
        folds.append({"chosen_on_half": choose_on, "auroc_on_choosing_half": {k: round(v, 4) for k, v in on_a.items()},
                      "chosen": best,
                      "auroc_on_other_half": round(M.auroc(candidates[best][half != choose_on],
                                                           error[half != choose_on]), 4)})
    return {"folds": folds}


def combination(candidates: dict[str, np.ndarray], error: np.ndarray, half: np.ndarray) -> list[float]:
    """AUROC on each half of a logistic regression over every candidate, fitted on the other half."""
    features = np.stack(list(candidates.values()), axis=1)
    out = []
    for report_on in (0, 1):
        fit_rows = half != report_on
        mu, sd = features[fit_rows].mean(axis=0), features[fit_rows].std(axis=0)
        weights = _logistic((features[fit_rows] - mu) / sd, error[fit_rows])
        scores = ((features[half == report_on] - mu) / sd) @ weights[:-1]
        out.append(round(M.auroc(scores, error[half == report_on]), 4))
    return out


def study(views: np.ndarray, error: np.ndarray, maps: np.ndarray | None) -> dict[str, Any]:
    candidates = pooled_candidates(views)
    if maps is not None:
        candidates |= spatial_candidates(maps)
    half = halves(len(error))
    out = held_out_choice(candidates, error, half)
    out |= {"views": f"{STUDY_POLICY.name} S={views.shape[1]}", "errors": int(error.sum()),
            "errors_per_half": [int(error[half == h].sum()) for h in (0, 1)],
            "all_photos": {name: round(M.auroc(score, error), 4) for name, score in candidates.items()},
            "combination_held_out": combination(candidates, error, half),
            "rank_correlation_with_shipped": {name: round(_rank_correlation(score, candidates[SHIPPED]), 3)
                                              for name, score in candidates.items()}}
    return out


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson's on ranks, tied values sharing their average rank (some scores are discrete)."""
    return float(np.corrcoef(_average_ranks(a), _average_ranks(b))[0, 1])


def _average_ranks(x: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # the 0-based rank where each distinct value's run starts
    out: np.ndarray = (first + (counts - 1) / 2)[inverse]
    return out


def central_feature_maps(name: str, paths: list[Path]) -> np.ndarray | None:
    """(N, C, h, w) float32 pre-pooling maps of each photo's central crop, or None if the backbone has none."""
    from models import ModelOptions, build_backbone, create_model

    built = build_backbone(name)
    features = getattr(built.backbone, "forward_features", None)
    if features is None:
        return None
    model = create_model(name, ModelOptions(mode="eager"))  # the library's planning, rendering and normalising
    out = []
    with torch.inference_mode():
        for path in paths:
            job = ImageJob(decode_file(path), EmbedOptions(1, CenterPolicy(), 0), model)
            pixels = render_view(job.source, job.render_views[0], model.spec.preprocess)
            out.append(features(model.normalize(pixels.unsqueeze(0))).numpy()[0])
    return np.stack(out).astype(np.float32)


def markdown(result: dict[str, Any]) -> str:
    folds = result["folds"]
    lines = ["| score | AUROC, even photos | AUROC, odd photos | all photos | rank corr. with the shipped |",
             "|---|---|---|---|---|"]
    for name, overall in result["all_photos"].items():
        even, odd = folds[0]["auroc_on_choosing_half"][name], folds[1]["auroc_on_choosing_half"][name]
        rho = result["rank_correlation_with_shipped"][name]
        lines.append(f"| {name} | {even:.3f} | {odd:.3f} | {overall:.3f} | {rho:.2f} |")
    for fold in folds:
        lines.append(f"\nchosen on the {('even', 'odd')[fold['chosen_on_half']]} photos: {fold['chosen']}, "
                     f"AUROC {fold['auroc_on_other_half']:.3f} on the other half")
    lines.append(f"logistic combination of all, fitted on one half: {result['combination_held_out']} held out "
                 "(even, odd)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from models import ModelOptions, create_model

    parser = argparse.ArgumentParser(prog="python -m evaluation.label_free", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/metta-eval"))
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--mode", default="auto", help="engine of the view embeddings (as evaluation.calibrate)")
    parser.add_argument("--limit", type=int, default=None, help="first N photos (smoke run)")
    parser.add_argument("--out", type=Path, default=Path("docs/quality/label_free.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = create_model(args.model, ModelOptions(mode=args.mode))
    assert model.head is not None, "the errors are the head's: the study needs a model with a classifier head"
    samples = load_samples(args.data, args.limit)
    labels = np.array([s.label for s in samples])
    views = cached_per_view(model, [s.path.name for s in samples], lambda i: decode_file(samples[i].path),
                            STUDY_POLICY, S_MAX, 0, args.cache_dir)[:, :STUDY_S].astype(np.float64)
    head_logits = views.mean(axis=1) @ model.head.weight.detach().double().numpy().T
    error = (head_logits + model.head.bias.detach().double().numpy()).argmax(axis=1) != labels
    log.info("central-crop feature maps of %d photos", len(samples))
    maps = central_feature_maps(args.model, [s.path for s in samples])
    result = study(views, error, None if maps is None else maps.astype(np.float64))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
