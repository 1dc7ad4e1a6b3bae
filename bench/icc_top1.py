"""Top-1 of the model's own head on the sample photos, central crop, with ICC → sRGB at decode on and off.

    .venv/bin/python -m bench.icc_top1 [--data DIR (default: $METTA_SAMPLES_DIR)] [--model efficientnet_lite0]

Each photo is decoded both ways (the service's decoder, `icc_to_srgb` True and False); photos whose pixels
do not change (no profile, or an sRGB one) are embedded once. One central crop per photo (`center`, S=1),
logits from `LoadedModel.head`. Prints one JSON object: top-1 both ways, how many photos changed, and the
paired flips (right only with the conversion / right only without it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from evaluation.data import MAX_PIXELS, MAX_SIDE, load_samples
from models import LoadedModel, create_model
from service.core.decode import decode_image
from service.core.embedding import embed
from service.testing import SAMPLE_DIR


def predicted_class(model: LoadedModel, image: torch.Tensor) -> int:
    assert model.head is not None, "this measurement needs a model with a classifier head"
    embedding = embed(model, [image], samples=1, policy="center", seed=0).embeddings
    with torch.no_grad():
        logits = model.head(torch.from_numpy(embedding).to(model.head.weight.dtype))
    return int(logits.argmax(dim=1).item())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=SAMPLE_DIR, help="the sample photos (default: $METTA_SAMPLES_DIR)")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--limit", type=int, default=None)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    model = create_model(args.model)
    samples = load_samples(args.data, args.limit)
    started = time.perf_counter()
    right_on, right_off, changed = [], [], 0
    for sample in samples:
        data = sample.path.read_bytes()
        on = decode_image(data, max_pixels=MAX_PIXELS, max_side=MAX_SIDE, icc_to_srgb=True)
        off = decode_image(data, max_pixels=MAX_PIXELS, max_side=MAX_SIDE, icc_to_srgb=False)
        class_on = predicted_class(model, on)
        same = on.shape == off.shape and torch.equal(on, off)
        changed += not same
        class_off = class_on if same else predicted_class(model, off)
        right_on.append(class_on == sample.label)
        right_off.append(class_off == sample.label)
    on_arr, off_arr = np.array(right_on), np.array(right_off)
    print(json.dumps({
        "model": model.name, "fingerprint": model.fingerprint, "photos": len(samples), "pixels_changed": changed,
        "top1_icc_to_srgb": round(float(on_arr.mean()), 4), "top1_no_conversion": round(float(off_arr.mean()), 4),
        "right_only_with_conversion": int((on_arr & ~off_arr).sum()),
        "right_only_without": int((off_arr & ~on_arr).sum()),
        "seconds": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()
