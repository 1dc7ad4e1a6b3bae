"""`python -m evaluation.service_check --url http://127.0.0.1:8000`: the task goals measured through a
running service, on the labelled sample photos sent as files.

- /v1/classify with its defaults against `policy=center` (S = 1): top-1, NLL of the calibrated
  probabilities (`top_k=1000`, so the label's probability is in the reply), ECE (15 bins on
  max_probability) and the AUROC of max_probability for top-1 errors;
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


def classify_scores(entries: list[dict[str, Any]], labels: np.ndarray) -> dict[str, Any]:
    probs = np.zeros((len(entries), 1000))
    for row, entry in enumerate(entries):
        for label in entry["labels"]:
            probs[row, label["class_index"]] = label["probability"]
    predicted, top = probs.argmax(axis=1), probs.max(axis=1)
    correct = predicted == labels
    return {"reply": entries[0]["_reply"], "top1": float(correct.mean()),
            "nll": float(M.nll_of_probs(probs, labels).mean()), "ece": ece(top, correct),
            "max_probability_auroc": M.auroc(-top, ~correct)}


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
        for name, options in (("classify_default", {**seed, "top_k": "1000"}),
                              ("classify_center", {**seed, "top_k": "1000", "policy": "center"})):
            results[name] = classify_scores(post_all(client, "/v1/classify", photos, options), labels)
            print(name, json.dumps(results[name]))
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
