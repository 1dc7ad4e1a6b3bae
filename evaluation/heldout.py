"""`python -m evaluation.heldout`: /v1/classify's default chosen on one half of the photos, reported on the other.

Every candidate way of making views is compared with the central crop on the same photos (paired): the
difference in top-1 (exact McNemar test and a paired-bootstrap interval), in calibrated NLL, in ECE and in
the AUROC of `max_probability` (paired-bootstrap intervals, photos resampled with their pairs). The photos
are split in two halves (photo i in half i % 2); on each half a temperature is fitted per candidate and a
candidate is chosen by the rule below; both are then *reported on the other half*, which neither saw. With
250 photos a half the intervals are wide: a top-1 difference needs about ±2 points to be seen.

The rule (`choose`, `RULE`), on the choosing half: among the candidates not significantly worse than the
central crop in top-1, ECE or AUROC, those whose NLL and ECE gains are both significant; else those with a
significant NLL gain and an ECE no worse than the centre's; each at the fewest views. On 250 photos such
gains are rarely significant, so failing both, the candidate with the strongest evidence of an NLL gain
(the lowest upper end of its interval) whose ECE is no worse. When the halves choose differently, the default
is the choice whose NLL gain is significant on the half that did not choose it (`final_choice`).

Per-view embeddings come from the evaluation's view cache (`--cache-dir`): each candidate family's views
are embedded once, at its largest S, and the rest are prefixes or subsets of them. Cold, the banks take
about 10 minutes on two CPU threads; `--banks NAME` fills one bank and exits (to keep runs short).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evaluation import metrics as M
from evaluation.calibrate import fit_temperature, halves
from evaluation.cli import DEFAULT_DATA
from evaluation.data import decode_file, load_samples
from evaluation.views import cached_per_view
from service.core.policies import CenterPolicy, CropFlipPolicy, Policy, TenCropPolicy

log = logging.getLogger("metta.heldout")
RESULTS_FILE = Path("docs/quality/heldout.json")


@dataclass(frozen=True)
class Candidate:
    """One way of making views: a policy's bank, and which of its views are averaged."""

    label: str
    bank: str  # a key of BANKS
    views: tuple[int, ...]  # indices into the bank's views
    request: dict[str, Any] | None  # the /v1/classify options that make exactly these views; None if none can

    @property
    def count(self) -> int:
        return len(self.views)


# The banks: a policy and the views embedded per photo (the largest S any candidate of it needs).
BANKS: dict[str, tuple[Policy, int]] = {
    "center": (CenterPolicy(), 1),
    "ten_crop": (TenCropPolicy(), 10),
    "ten_crop_288": (TenCropPolicy(resize_scale=1.125), 10),
    "ten_crop_320": (TenCropPolicy(resize_scale=1.25), 10),
    "crop_flip_0.08": (CropFlipPolicy(scale=(0.08, 1.0)), 16),
    "crop_flip_0.25": (CropFlipPolicy(scale=(0.25, 1.0)), 32),
    "crop_flip_0.5": (CropFlipPolicy(scale=(0.5, 1.0)), 16),
}


def _ten_crop(bank: str, resize: str, scale: float | None) -> list[Candidate]:
    served = scale is None  # a request names a policy, not its parameters: only the served ten_crop
    return [
        Candidate(f"center + flip{resize}", bank, (0, 5), None),
        Candidate(f"five crops{resize}", bank, tuple(range(5)),
                  {"policy": "ten_crop", "samples": 5} if served else None),
        Candidate(f"ten crops{resize}", bank, tuple(range(10)),
                  {"policy": "ten_crop", "samples": 10} if served else None),
    ]


def _crop_flip(scale: float, samples: Sequence[int]) -> list[Candidate]:
    return [Candidate(f"crop_flip ({scale:g}, 1) S={s}", f"crop_flip_{scale:g}", tuple(range(s)),
                      {"policy": "crop_flip", "samples": s} if scale == 0.25 else None) for s in samples]


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("center", "center", (0,), {"policy": "center"}),
    *_ten_crop("ten_crop", "", None),
    *_ten_crop("ten_crop_288", " (288-px resize)", 1.125),
    *_ten_crop("ten_crop_320", " (320-px resize)", 1.25),
    *_crop_flip(0.08, (4, 8, 16)),
    *_crop_flip(0.25, (2, 4, 8, 10, 16, 32)),
    *_crop_flip(0.5, (4, 8, 16)),
)


# ---- the comparison -------------------------------------------------------------------------------

def calibrated(logits: np.ndarray, temperature: np.ndarray | float, labels: np.ndarray) -> M.Predictions:
    """Predictions at a temperature (one, or one per photo)."""
    scaled = logits / np.reshape(temperature, (-1, 1))
    probs = M.softmax(scaled)
    return M.Predictions(logits.argmax(axis=1) == labels, M.nll_of_logits(scaled, labels), probs.max(axis=1))


RULE = ("eligible: top-1 not significantly worse than the central crop (McNemar interval's upper end >= 0) and "
        "neither ECE nor AUROC significantly worse; first the candidates whose NLL and ECE gains are both "
        "significant (bootstrap intervals below 0), else those whose NLL gain is significant and whose ECE is no "
        "worse than the centre's, each at the fewest views (then the lower NLL); if none, the candidate with the "
        "strongest evidence of an NLL gain (the lowest upper end of its NLL interval) whose ECE is no worse")


def choose(rows: Sequence[dict[str, Any]]) -> str | None:
    """The rule above, on one half's comparison rows (each: label, views, figures, vs_center)."""
    def versus(row: dict[str, Any], key: str) -> dict[str, float]:
        interval: dict[str, float] = row["vs_center"][key]
        return interval

    eligible = [r for r in rows if "vs_center" in r and versus(r, "top1")["hi"] >= 0
                and versus(r, "ece")["lo"] <= 0 and versus(r, "auroc")["hi"] >= 0]
    ece_no_worse = [r for r in eligible if versus(r, "ece")["diff"] <= 0]
    significant = [r for r in ece_no_worse if versus(r, "nll")["hi"] < 0]
    both = [r for r in significant if versus(r, "ece")["hi"] < 0]
    if both or significant:
        best = min(both or significant, key=lambda r: (r["views"], r["figures"]["nll"]))
    elif ece_no_worse:
        best = min(ece_no_worse, key=lambda r: versus(r, "nll")["hi"])
    else:
        return None
    label: str = best["label"]
    return label


def run(bank: Callable[[str], np.ndarray], labels: np.ndarray, *, weight: np.ndarray, bias: np.ndarray,
        bootstrap: int = 2000, seed: int = 0, candidates: Sequence[Candidate] = CANDIDATES) -> dict[str, Any]:
    """Choose on each half, report on the other; and every candidate cross-fitted on all the photos."""
    logits = {c.label: bank(c.bank)[:, list(c.views)].mean(axis=1) @ weight.T + bias for c in candidates}
    center_label = candidates[0].label
    half = halves(len(labels))
    # each half's temperature per candidate, fitted on that half
    temperatures = {c.label: [fit_temperature(logits[c.label][half == h], labels[half == h]) for h in (0, 1)]
                    for c in candidates}

    def rows_for(rows: np.ndarray, temperature: dict[str, np.ndarray | float]) -> list[dict[str, Any]]:
        predictions = {c.label: calibrated(logits[c.label][rows], temperature[c.label], labels[rows])
                       for c in candidates}
        out = []
        for c in candidates:
            row: dict[str, Any] = {"label": c.label, "views": c.count, "request": c.request,
                                   "figures": M.prediction_figures(predictions[c.label])}
            if c.label != center_label:
                row["vs_center"] = M.versus(predictions[center_label], predictions[c.label], bootstrap=bootstrap,
                                          seed=seed)
            out.append(row)
        return out

    splits = []
    for chooser in (0, 1):
        reporter = 1 - chooser
        fitted: dict[str, np.ndarray | float] = {label: ts[chooser] for label, ts in temperatures.items()}
        on_chooser = rows_for(np.flatnonzero(half == chooser), fitted)
        chosen = choose(on_chooser)
        log.info("chosen on half %d: %s", chooser, chosen)
        splits.append({"chosen_on_half": chooser, "reported_on_half": reporter, "chosen": chosen,
                       "photos": int((half == reporter).sum()),
                       "choosing": on_chooser,
                       "reported": rows_for(np.flatnonzero(half == reporter), fitted)})
    # all photos, each under the temperature fitted on the other half
    pooled = rows_for(np.arange(len(labels)), {label: np.where(half == 0, ts[1], ts[0])
                                               for label, ts in temperatures.items()})
    return {"photos": len(labels), "halves": "photo i in half i % 2", "rule": RULE, "bootstrap": bootstrap,
            "candidates": [{"label": c.label, "bank": c.bank, "views": list(c.views),
                            "request": c.request} for c in candidates],
            "temperatures": {label: [round(t, 4) for t in ts] for label, ts in temperatures.items()},
            "splits": splits, "default": final_choice(splits), "cross_fitted": pooled}


def final_choice(splits: Sequence[dict[str, Any]]) -> str | None:
    """One default from the two halves' choices: theirs if they agree; else the choice whose NLL gain is
    significant on the half that did not choose it (then the fewer views)."""
    reported = {split["chosen"]: next(r for r in split["reported"] if r["label"] == split["chosen"])
                for split in splits if split["chosen"] is not None}
    if len(reported) <= 1:
        return next(iter(reported), None)
    held = [row for row in reported.values() if row["vs_center"]["nll"]["hi"] < 0] or list(reported.values())
    label: str = min(held, key=lambda row: row["views"])["label"]
    return label


def _pt(interval: dict[str, float], scale: float = 100, digits: int = 1) -> str:
    return (f"{scale * interval['diff']:+.{digits}f} [{scale * interval['lo']:+.{digits}f}, "
            f"{scale * interval['hi']:+.{digits}f}]").replace("-", "−")


def comparison_table(rows: Sequence[dict[str, Any]], chosen: str | None = None) -> str:
    lines = ["| views | S | top-1 % | Δ top-1 pt [95 % exact] (+/−) | NLL | Δ NLL [95 %] | ECE | Δ ECE [95 %] "
             "| AUROC | Δ AUROC [95 %] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        f = row["figures"]
        cells = ["—"] * 4
        if "vs_center" in row:
            v = row["vs_center"]
            cells = [f"{_pt(v['top1'])} (+{v['top1']['b_only']}/−{v['top1']['a_only']})", _pt(v["nll"], 1, 3),
                     _pt(v["ece"], 1, 3), _pt(v["auroc"], 1, 3)]
        name = f"**{row['label']}**" if row["label"] == chosen else row["label"]
        lines.append(f"| {name} | {row['views']} | {100 * f['top1']:.1f} | {cells[0]} | {f['nll']:.3f} | {cells[1]} "
                     f"| {f['ece']:.3f} | {cells[2]} | {f['auroc']:.3f} | {cells[3]} |")
    return "\n".join(lines)


def summary_markdown(study: dict[str, Any]) -> str:
    parts = [f"Default: {study['default']} ({study['rule']}; the halves' choices: "
             f"{', '.join(str(split['chosen']) for split in study['splits'])})\n"]
    for split in study["splits"]:
        parts += [f"## Chosen on half {split['chosen_on_half']}: {split['chosen']}; reported on half "
                  f"{split['reported_on_half']} ({split['photos']} photos)\n",
                  comparison_table(split["reported"], split["chosen"]), ""]
    parts += [f"## All {study['photos']} photos, each under the temperature fitted on the other half\n",
              comparison_table(study["cross_fitted"], study["default"])]
    return "\n".join(parts)


def bank_views(model: Any, data_dir: Path, cache_dir: Path | None, seed: int, limit: int | None
               ) -> tuple[Callable[[str], np.ndarray], np.ndarray]:
    """A bank name → its (N, S, dim) float64 per-view embeddings (cached); and the photos' labels."""
    samples = load_samples(data_dir, limit)
    ids = [s.path.name for s in samples]
    memo: dict[str, np.ndarray] = {}

    def bank(name: str) -> np.ndarray:
        if name not in memo:
            policy, count = BANKS[name]
            memo[name] = cached_per_view(model, ids, lambda i: decode_file(samples[i].path), policy, count, seed,
                                         cache_dir).astype(np.float64)
        return memo[name]

    return bank, np.array([s.label for s in samples])


def main(argv: list[str] | None = None) -> None:
    from models import ModelOptions, create_model

    parser = argparse.ArgumentParser(prog="python -m evaluation.heldout", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache-dir", default=".cache/metta-eval", help="per-view embedding cache ('' for none)")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N photos (smoke run)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples")
    parser.add_argument("--banks", default="", help="only fill these banks' cache (comma-separated) and exit")
    parser.add_argument("--out", type=Path, default=RESULTS_FILE, help="the study's JSON (tables beside it, .md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not (args.data / "labels.tsv").is_file():
        sys.exit(f"evaluation.heldout: no labels.tsv in {args.data}")
    model = create_model(args.model, ModelOptions(mode=args.mode))
    bank, labels = bank_views(model, args.data, Path(args.cache_dir) if args.cache_dir else None, args.seed,
                              args.limit)
    if args.banks:
        for name in args.banks.split(","):
            bank(name)
        return
    if model.head is None:
        sys.exit(f"evaluation.heldout: model {model.name} has no classifier head")
    study = run(bank, labels, weight=model.head.weight.detach().double().numpy(),
                bias=model.head.bias.detach().double().numpy(), bootstrap=args.bootstrap, seed=args.seed)
    study["banks"] = {name: {"policy": repr(policy), "S": count} for name, (policy, count) in BANKS.items()}
    study.update(model=model.name, weights_sha256=model.weights_sha, engine=model.mode, seed=args.seed,
                 command="python -m evaluation.heldout" + ("" if argv is None else " " + " ".join(argv)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(study, indent=1) + "\n")
    tables = summary_markdown(study)
    title = f"# {study['command']}: {model.name} ({model.mode}), {study['photos']} photos, seed {args.seed}"
    args.out.with_suffix(".md").write_text(f"{title}\n\n{tables}\n")
    print(tables)


if __name__ == "__main__":
    main()
