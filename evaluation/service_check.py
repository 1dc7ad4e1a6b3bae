"""`python -m evaluation.service_check --url http://127.0.0.1:8000`: the task goals measured through a
running service, on the labelled sample photos sent as files.

- /v1/classify with its defaults against `policy=center` (S = 1): top-1, NLL of the calibrated
  probabilities (`top_k=1000`, so the label's probability is in the reply), ECE (15 bins on
  max_probability) and the AUROC of max_probability for top-1 errors; the paired differences with their
  95 % intervals, and the goals (top-1 not worse beyond paired noise, c − b ≤ 1.645 √(b + c), and within
  1.5 points; NLL no worse; ECE ≤ 0.045; AUROC ≥ 0.88);
- /v1/embeddings with its defaults against `policy=center`: near-duplicate recall@1 (each photo's
  edited copy, made as in `metta eval`, should find the photo).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageOps

from evaluation import metrics as M
from evaluation.calibrate import ece
from evaluation.cli import DEFAULT_DATA
from evaluation.data import QueryEdits, Sample, edit_query, load_samples

BATCH = 8  # images per request


def post_all(client: httpx.Client, path: str, images: list[bytes], options: dict[str, str]) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = []
    for start in range(0, len(images), BATCH):
        files = [("images", (f"{i}.jpg", blob, "image/jpeg")) for i, blob in enumerate(images[start:start + BATCH])]
        response = client.post(path, files=files, data=options)
        response.raise_for_status()
        reply = response.json()
        data += reply["data"]
        last = reply
    return [{**entry, "_reply": {k: v for k, v in last.items() if k not in ("data", "usage")}} for entry in data]


def predictions(entries: list[dict[str, Any]], labels: np.ndarray) -> M.Predictions:
    probs = np.zeros((len(entries), 1000))
    for row, entry in enumerate(entries):
        for label in entry["labels"]:
            probs[row, label["class_index"]] = label["probability"]
    return M.Predictions(probs.argmax(axis=1) == labels, M.nll_of_probs(probs, labels), probs.max(axis=1))


def classify_scores(entries: list[dict[str, Any]], p: M.Predictions) -> dict[str, Any]:
    return {"reply": entries[0]["_reply"], "top1": float(p.correct.mean()), "nll": float(p.nll.mean()),
            "ece": ece(p.max_probability, p.correct), "max_probability_auroc": M.auroc(-p.max_probability, ~p.correct)}


def goals(center: M.Predictions, default: M.Predictions) -> dict[str, Any]:
    """The default against its central crop, paired, and the issue's goals for it."""
    versus = M.versus(center, default)
    b, c = versus["top1"]["b_only"], versus["top1"]["a_only"]  # only the default right / only the center right
    figures = M.prediction_figures(default)
    return {"versus_center": versus, "goals": {
        "top1_not_worse_beyond_paired_noise": bool(c - b <= 1.645 * np.sqrt(b + c)),
        "top1_within_1.5_points": bool(versus["top1"]["diff"] >= -0.015),
        "nll_no_worse": bool(figures["nll"] <= float(center.nll.mean())),
        "ece_at_most_0.045": bool(figures["ece"] <= 0.045), "auroc_at_least_0.88": bool(figures["auroc"] >= 0.88)}}


def query_bytes(sample: Sample, index: int, seed: int, edits: QueryEdits) -> bytes:
    with Image.open(sample.path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    return edit_query(image, np.random.default_rng([seed, index]), edits)


def recall_at_1(client: httpx.Client, photos: list[bytes], queries: list[bytes], options: dict[str, str]) -> float:
    database = np.array([e["embedding"] for e in post_all(client, "/v1/embeddings", photos, options)])
    asked = np.array([e["embedding"] for e in post_all(client, "/v1/embeddings", queries, options)])
    hits = M.retrieval_per_query(asked, database, np.eye(len(photos), dtype=bool))["hit_at_1"]
    return float(hits.mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evaluation.service_check", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("docs/quality/service_check.json"))
    args = parser.parse_args(argv)
    samples = load_samples(args.data, args.limit)
    labels = np.array([s.label for s in samples])
    photos = [s.path.read_bytes() for s in samples]
    seed = {"seed": str(args.seed)}
    results: dict[str, Any] = {"photos": len(samples), "url": args.url}
    with httpx.Client(base_url=args.url, timeout=600) as client:
        predicted = {}
        for name, options in (("classify_default", {**seed, "top_k": "1000"}),
                              ("classify_center", {**seed, "top_k": "1000", "policy": "center"})):
            entries = post_all(client, "/v1/classify", photos, options)
            predicted[name] = predictions(entries, labels)
            results[name] = classify_scores(entries, predicted[name])
            print(name, json.dumps(results[name]))
        results["classify_default_vs_center"] = goals(predicted["classify_center"], predicted["classify_default"])
        print("classify_default_vs_center", json.dumps(results["classify_default_vs_center"]["goals"]))
        if not args.skip_retrieval:
            edits = QueryEdits()
            queries = [query_bytes(s, i, args.seed, edits) for i, s in enumerate(samples)]
            for name, options in (("embeddings_default", seed), ("embeddings_center", {**seed, "policy": "center"})):
                results[name] = {"recall_at_1": recall_at_1(client, photos, queries, options)}
                print(name, json.dumps(results[name]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
