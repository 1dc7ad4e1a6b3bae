"""`python -m evaluation.calibrate`: temperatures for /v1/classify, the per-task figures.

On the labelled sample photos, from the per-view cache of `metta eval` (each policy's views computed once):

1. a temperature per (policy, S bucket 1 / 2–4 / 5–16 / 17+), fitted by NLL on every S of the bucket
   (S is a prefix of one 32-view plan) → `models/calibration.json`, with the expected calibration error
   cross-fitted: the temperature fitted on one half of the photos, the ECE measured on the other, and
   vice versa;
2. per way of making views: top-1, NLL (T = 1 and calibrated), ECE and near-duplicate recall@1 → the
   one file both the README and `GET /v1/models` read, `models/policy_quality.json`;
(The label-free uncertainty score is `python -m evaluation.label_free`.)
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from evaluation import metrics as M
from evaluation.cli import DEFAULT_DATA
from evaluation.data import QueryEdits, decode_file, load_samples, make_query
from evaluation.views import cached_per_view
from models.calibration import CALIBRATION_FILE, S_BUCKETS
from models.policy_quality import POLICY_QUALITY_FILE, markdown_table
from service.core.policies import CenterPolicy, CropFlipPolicy, MultiscalePolicy, Policy, TenCropPolicy

log = logging.getLogger("metta.calibrate")
# The endpoints' defaults (`default_policy`/`default_samples`, `classify_policy`/`classify_samples`; a test keeps
# them equal to the settings), to mark their rows of the table.
EMBEDDINGS_DEFAULT = ("multiscale", 3)
CLASSIFY_DEFAULT = ("crop_flip", 32)
S_MAX = 32  # the largest S of a bank; the 17+ bucket is fitted on S = 17 … 32
ECE_BINS = 15


# ---- temperature and ECE -------------------------------------------------------------------------

def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the mean NLL of softmax(logits / T): golden-section search on log T (the NLL is
    convex in 1/T, so unimodal in log T)."""
    low, high = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2

    def nll(log_t: float) -> float:
        return float(M.nll_of_logits(logits / np.exp(log_t), labels).mean())

    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return float(np.exp((low + high) / 2))


def ece(max_probability: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: Σ_bins (share of images) × |accuracy − mean confidence|, equal-width bins."""
    return float(M.ece_statistic((max_probability, correct), np.arange(len(correct))[None, :], bins)[0])


def halves(count: int) -> np.ndarray:
    """Photo i belongs to half i % 2 (the photos are in class order, so both halves span the classes)."""
    return np.arange(count) % 2


def bucket_samples(name: str, largest: int) -> list[int]:
    for low, high, bucket in S_BUCKETS:
        if bucket == name:
            return list(range(low, min(high if high is not None else largest, largest) + 1))
    raise ValueError(name)


def fit(per_s: dict[int, np.ndarray], samples: list[int], labels: np.ndarray, rows: np.ndarray) -> float:
    logits = np.concatenate([per_s[s][rows] for s in samples])
    return fit_temperature(logits, np.concatenate([labels[rows]] * len(samples)))


def cross_fitted_probabilities(per_s: dict[int, np.ndarray], samples: list[int], at: int,
                               labels: np.ndarray) -> np.ndarray:
    """Calibrated probabilities at S = `at`, each photo's temperature fitted on the other half (pooled S)."""
    half = halves(len(labels))
    out = np.empty_like(per_s[at])
    for h in (0, 1):
        temperature = fit(per_s, samples, labels, half != h)
        out[half == h] = M.softmax(per_s[at][half == h] / temperature)
    return out


# ---- the study -----------------------------------------------------------------------------------

def run(model: Any, data_dir: Path, cache_dir: Path, seed: int = 0, limit: int | None = None) -> dict[str, Any]:
    samples = load_samples(data_dir, limit)
    ids = [s.path.name for s in samples]
    labels = np.array([s.label for s in samples])
    edits = QueryEdits()
    query_ids = [f"{name}|{edits!r}|seed={seed}" for name in ids]

    def photos(policy: Policy, count: int) -> np.ndarray:
        views = cached_per_view(model, ids, lambda i: decode_file(samples[i].path), policy, count, seed, cache_dir)
        return views.astype(np.float64)

    def queries(policy: Policy, count: int) -> np.ndarray:
        views = cached_per_view(model, query_ids, lambda i: make_query(samples[i].path, i, seed, edits), policy,
                                count, seed, cache_dir)
        return views.astype(np.float64)

    assert model.head is not None, "calibration needs a model with a classifier head"
    weight = model.head.weight.detach().double().numpy()
    bias = model.head.bias.detach().double().numpy()

    def logits(means: np.ndarray) -> np.ndarray:
        out: np.ndarray = means @ weight.T + bias
        return out

    banks = {"center": photos(CenterPolicy(), 1), "crop_flip": photos(CropFlipPolicy(), S_MAX),
             "multiscale": photos(MultiscalePolicy(), S_MAX), "ten_crop": photos(TenCropPolicy(), 10)}
    per_s = {name: {s: logits(bank[:, :s].mean(axis=1)) for s in range(1, bank.shape[1] + 1)}
             for name, bank in banks.items()}

    temperatures: dict[str, dict[str, float]] = {}
    calibration_ece: dict[str, dict[str, float]] = {}
    for name, by_s in per_s.items():
        temperatures[name], calibration_ece[name] = {}, {}
        for _, _, bucket in S_BUCKETS:
            s_list = [s for s in bucket_samples(bucket, S_MAX) if s in by_s]
            if not s_list:
                continue
            temperatures[name][bucket] = round(fit(by_s, s_list, labels, np.ones(len(labels), bool)), 4)
            at = s_list[len(s_list) // 2]  # the ECE of one S in the bucket, with the bucket's cross-fitted T
            probs = cross_fitted_probabilities(by_s, s_list, at, labels)
            calibration_ece[name][f"{bucket} (S={at})"] = round(
                ece(probs.max(axis=1), probs.argmax(axis=1) == labels), 4)

    rows = table_rows(banks, per_s, temperatures, labels, logits, queries)
    return {"photos": len(labels), "seed": seed, "temperatures": temperatures, "ece_cross_fitted": calibration_ece,
            "rows": rows}


def table_rows(banks: dict[str, np.ndarray], per_s: dict[str, dict[int, np.ndarray]],
               temperatures: dict[str, dict[str, float]], labels: np.ndarray,
               logits: Callable[[np.ndarray], np.ndarray], queries: Callable[[Policy, int], np.ndarray]
               ) -> list[dict[str, Any]]:
    """The issue's table: classification (eq. 7) and near-duplicate recall@1 per way of making views."""
    from models.calibration import s_bucket

    center, crop_flip, multiscale = banks["center"], banks["crop_flip"], banks["multiscale"]
    q_center, q_crop, q_multi = (queries(CenterPolicy(), 1), queries(CropFlipPolicy(), 8),
                                 queries(MultiscalePolicy(), 3))
    center_norm = np.linalg.norm(center[:, 0], axis=1, keepdims=True)

    def l2_scaled(views: np.ndarray, norm: np.ndarray) -> np.ndarray:
        out: np.ndarray = M.l2_rows(views).mean(axis=1) * norm
        return out

    ten_crop = banks["ten_crop"]
    # (label, request options or None, photo mean, query mean, served policy for the temperature)
    ways: list[tuple[str, dict[str, Any] | None, np.ndarray, np.ndarray | None, str | None]] = [
        ("center S=1", {"policy": "center"}, center[:, 0], q_center[:, 0], "center"),
        ("crop_flip S=4", {"policy": "crop_flip", "samples": 4}, crop_flip[:, :4].mean(1), q_crop[:, :4].mean(1),
         "crop_flip"),
        ("crop_flip S=8", {"policy": "crop_flip", "samples": 8}, crop_flip[:, :8].mean(1), q_crop.mean(1),
         "crop_flip"),
        ("crop_flip S=10", {"policy": "crop_flip", "samples": 10}, crop_flip[:, :10].mean(1), None, "crop_flip"),
        ("crop_flip S=16", {"policy": "crop_flip", "samples": 16}, crop_flip[:, :16].mean(1), None, "crop_flip"),
        ("crop_flip S=32", {"policy": "crop_flip", "samples": 32}, crop_flip.mean(1), None, "crop_flip"),
        ("ten_crop S=5 (five crops)", {"policy": "ten_crop", "samples": 5}, ten_crop[:, :5].mean(1), None,
         "ten_crop"),
        ("ten_crop S=10 (ten crops)", {"policy": "ten_crop", "samples": 10}, ten_crop.mean(1), None, "ten_crop"),
        ("multiscale S=3", {"policy": "multiscale", "samples": 3}, multiscale[:, :3].mean(1), q_multi.mean(1),
         "multiscale"),
        ("multiscale S=8", {"policy": "multiscale", "samples": 8}, multiscale[:, :8].mean(1), None, "multiscale"),
        ("multiscale S=3, per-view L2 × the center's norm", None, l2_scaled(multiscale[:, :3], center_norm),
         l2_scaled(q_multi, np.linalg.norm(q_center[:, 0], axis=1, keepdims=True)), None),
        ("center + crop_flip S=8 (mean of 9 views)", None,
         np.concatenate([center, crop_flip[:, :8]], axis=1).mean(1),
         np.concatenate([q_center, q_crop], axis=1).mean(1), None),
        ("multiscale S=3 + crop_flip S=8 (mean of 11 views)", None,
         np.concatenate([multiscale[:, :3], crop_flip[:, :8]], axis=1).mean(1),
         np.concatenate([q_multi, q_crop], axis=1).mean(1), None),
    ]
    defaults = {EMBEDDINGS_DEFAULT: "/v1/embeddings default", CLASSIFY_DEFAULT: "/v1/classify default"}
    relevant = np.eye(len(labels), dtype=bool)
    half = halves(len(labels))
    rows = []
    center_cross: M.Predictions | None = None
    for label, request, photo_mean, query_mean, served in ways:
        lg = logits(photo_mean)
        samples = int(request.get("samples", 1)) if request else 0
        if served is not None:
            temperature = temperatures[served][s_bucket(samples)]
            bucket = [s for s in bucket_samples(s_bucket(samples), S_MAX) if s in per_s[served]]
            probs = cross_fitted_probabilities(per_s[served], bucket, samples, labels)
        else:  # not one request: a temperature of its own, cross-fitted the same way
            temperature = fit_temperature(lg, labels)
            probs = np.empty_like(lg)
            for h in (0, 1):
                probs[half == h] = M.softmax(lg[half == h] / fit_temperature(lg[half != h], labels[half != h]))
        cross = probs.max(axis=1)
        correct = lg.argmax(axis=1) == labels
        # the same photos under the temperature fitted on the other half: what the paired intervals compare
        cross_fitted = M.Predictions(correct, M.nll_of_probs(probs, labels), cross)
        recall = None
        if query_mean is not None:
            recall = float(M.retrieval_per_query(query_mean, photo_mean, relevant)["hit_at_1"].mean())
        key = (request or {}).get("policy"), (request or {}).get("samples", 1)
        row = {
            "views": label + (f" ({defaults[key]})" if key in defaults else ""), "request": request,
            "top1": round(float(correct.mean()), 4),
            "nll": round(float(M.nll_of_logits(lg, labels).mean()), 4),
            "nll_calibrated": round(float(M.nll_of_logits(lg / temperature, labels).mean()), 4),
            "ece": round(ece(cross, probs.argmax(axis=1) == labels), 4),
            "max_probability_auroc": round(M.auroc(-cross, ~correct), 4),
            "recall_at_1": None if recall is None else round(recall, 4)}
        if center_cross is None:
            center_cross = cross_fitted
        else:
            row["vs_center"] = paired_intervals(center_cross, cross_fitted)
        rows.append(row)
    return rows


def paired_intervals(center: M.Predictions, other: M.Predictions) -> dict[str, Any]:
    """The table's paired differences from the central crop, rounded: top-1 (McNemar's exact 95 % interval),
    cross-fitted NLL, ECE and AUROC of max_probability (95 % paired bootstrap)."""
    compared = M.versus(center, other)
    out: dict[str, Any] = {"photos": len(center.correct)}
    for name, key in (("top1", "top1"), ("nll_calibrated", "nll"), ("ece", "ece"), ("max_probability_auroc", "auroc")):
        out[name] = {part: round(float(compared[key][part]), 4) for part in ("diff", "lo", "hi")}
    return out


def write_files(model: Any, study: dict[str, Any], calibration_path: Path, quality_path: Path) -> None:
    provenance = {"photos": study["photos"], "seed": study["seed"], "engine": model.mode,
                  "command": "python -m evaluation.calibrate"}
    calibration = {"models": [{"model": model.name, "weights_sha256": model.weights_sha, **provenance,
                               "temperatures": study["temperatures"], "ece_cross_fitted": study["ece_cross_fitted"]}]}
    calibration_path.write_text(json.dumps(calibration, indent=1) + "\n")
    quality = {"models": {model.name: {"weights_sha256": model.weights_sha, **provenance, "rows": study["rows"]}}}
    quality_path.write_text(json.dumps(quality, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    from models import ModelOptions, create_model

    parser = argparse.ArgumentParser(prog="python -m evaluation.calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/metta-eval"))
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--limit", type=int, default=None, help="first N photos (smoke run; files not written)")
    parser.add_argument("--out", type=Path, default=Path("docs/quality/calibration.json"), help="the full study")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = create_model(args.model, ModelOptions(mode=args.mode))
    study = run(model, args.data, args.cache_dir, limit=args.limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(study, indent=1) + "\n")
    if args.limit is None:
        write_files(model, study, CALIBRATION_FILE, POLICY_QUALITY_FILE)
        from models.policy_quality import load_policy_quality

        load_policy_quality.cache_clear()
        print(markdown_table(model.name))
    print(json.dumps({"temperatures": study["temperatures"], "ece": study["ece_cross_fitted"]}, indent=1))


if __name__ == "__main__":
    main()
