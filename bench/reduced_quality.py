"""The reduced decode's quality, paired with the full decode: top-1 and near-duplicate recall@1 on 12 MP photos.

    python -m bench.photo_set --out /tmp/plain-aspect --count 500 --plain --keep-aspect
    python -m bench.reduced_quality --files /tmp/plain-aspect

The files are the sample photos upscaled (`bench.photo_set --plain`), named by their index in the sample folder,
whose labels.tsv gives the classes. Every photo is embedded twice in this process (efficientnet_lite0, seed 0):
decoded whole, and decoded at the reduction its views allow (`decode_reduction`, the service's margins).
- top-1 of the model's own head at /v1/classify's default (crop_flip S=32), and of the central crop (S=1);
- near-duplicate recall@1 at /v1/embeddings' default (multiscale S=3): each photo's edited copy (made from
  the 12 MP picture as `metta eval` makes one: crop, turn, colour jitter, grey, half size, JPEG q30) should
  find the photo among all of them; queries and gallery decoded the same way, as one deployment would.
Each comparison is paired: the photos only one way got right and the exact McNemar p-value.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.reduced_decode import embed_file
from evaluation import metrics as M
from evaluation.data import QueryEdits, edit_query
from models import LoadedModel, create_model
from service.core.embedding import EmbedOptions
from service.core.policies import make_policy
from service.testing import sample_labels, sample_paths


def embeddings(model: LoadedModel, files: list[bytes], options: EmbedOptions, *, reduced: bool) -> np.ndarray:
    return np.stack([embed_file(model, data, options, reduced=reduced) for data in files])


def top1(model: LoadedModel, means: np.ndarray, labels: np.ndarray) -> np.ndarray:
    assert model.head is not None
    with torch.inference_mode():
        logits = model.head(torch.from_numpy(means.astype(np.float32))).numpy()
    correct: np.ndarray = logits.argmax(axis=1) == labels
    return correct


def paired(name: str, full: np.ndarray, reduced: np.ndarray) -> dict[str, Any]:
    test = M.mcnemar_exact(full, reduced)
    row = {"what": name, "photos": len(full), "full": float(full.mean()), "reduced": float(reduced.mean()),
           "only_full": test["a_only"], "only_reduced": test["b_only"], "p": test["p"]}
    print(f"{name}: full {100 * full.mean():.1f} %, reduced {100 * reduced.mean():.1f} % "
          f"(right only full {test['a_only']}, only reduced {test['b_only']}, McNemar p {test['p']:.2f})", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    classes = {path.name: label for path, label in sample_labels()}
    names = [path.name for path in sample_paths()]
    paths = sorted(args.files.glob("[0-9][0-9][0-9][0-9].jpg"))
    if not paths or not classes:
        raise SystemExit("needs the upscaled set (see the docstring) and the sample photos' labels.tsv")
    files = [path.read_bytes() for path in paths]
    labels = np.array([classes[names[int(path.stem)]] for path in paths])
    model = create_model("efficientnet_lite0")
    rows = []
    for policy, samples in (("crop_flip", 32), ("center", 1)):
        options = EmbedOptions(samples, make_policy(policy), 0)
        rows.append(paired(f"top-1, {policy} S={samples}", top1(model, embeddings(model, files, options, reduced=False),
                                                                  labels),
                           top1(model, embeddings(model, files, options, reduced=True), labels)))
    queries = []
    for index, data in enumerate(files):
        with Image.open(io.BytesIO(data)) as picture:
            queries.append(edit_query(picture.convert("RGB"), np.random.default_rng(index), QueryEdits()))
    options = EmbedOptions(3, make_policy("multiscale"), 0)
    relevant = np.eye(len(files), dtype=bool)
    hits = {}
    for reduced in (False, True):
        gallery = embeddings(model, files, options, reduced=reduced)
        hits[reduced] = M.retrieval_per_query(embeddings(model, queries, options, reduced=reduced), gallery,
                                              relevant)["hit_at_1"]
    rows.append(paired("near-duplicate recall@1, multiscale S=3", hits[False], hits[True]))
    if args.out:
        args.out.write_text(json.dumps({"files": str(args.files), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
