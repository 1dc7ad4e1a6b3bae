"""The reduced decode against the full decode: embedding cosine and time per photo, per policy.

    python -m bench.photo_set --out /tmp/photo-set --count 40 --formats jpeg,heic,avif,png
    python -m bench.reduced_decode --files /tmp/photo-set [--margin 4]

For every JPEG of the set (12 MP with fine detail): the embedding (efficientnet_lite0, seed 0) of the photo
decoded whole and decoded at the reduction its views allow (`decode_reduction`, by the service's margins unless
`--margin` sets one for all), at the service's defaults (multiscale S=3 for /v1/embeddings, crop_flip S=32 for
/v1/classify), crop_flip S=10, two views and the central crop; the minimum cosine and the median time of decode +
views + forward, and for the worst photo each view's own cosine (which views lose). Then the same photo as
JPEG, HEIC, AVIF and PNG (where the set has them): the minimum cosine between any two of its formats, each
decoded as the service does.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import numpy as np

from models import LoadedModel, create_model
from service.core.decode import SizeLimits, open_image
from service.core.embedding import (
    EmbedOptions,
    ImageJob,
    decode_job,
    decode_reduction,
    forward_batch,
    render_batch,
    run_chunks,
)
from service.core.policies import make_policy

LIMITS: SizeLimits = {"max_pixels": 50_000_000, "max_side": 20_000}


def embedding(model: LoadedModel, job: ImageJob) -> np.ndarray:
    run_chunks(model, [job.take(len(job.views))])
    mean = job.result().embedding
    return mean / np.linalg.norm(mean)


def embed_file(model: LoadedModel, data: bytes, options: EmbedOptions, *, reduced: bool,
               margin: float | None = None) -> np.ndarray:
    opened = open_image(data, **LIMITS)
    reduction = decode_reduction(opened, options, model, margin=margin) if reduced else 1
    return embedding(model, decode_job(opened, options, model, reduction))


def view_cosines(model: LoadedModel, data: bytes, options: EmbedOptions, margin: float | None) -> list[float]:
    """Each view's own embedding, full decode against reduced: which views lose."""
    per_view = []
    for reduced in (False, True):
        opened = open_image(data, **LIMITS)
        reduction = decode_reduction(opened, options, model, margin=margin) if reduced else 1
        job = decode_job(opened, options, model, reduction)
        rendered = render_batch(model, [job.take(len(job.views))])
        views = forward_batch(model, rendered)[0]
        assert views is not None
        per_view.append(views / np.linalg.norm(views, axis=1, keepdims=True))
    return [float(c) for c in (per_view[0] * per_view[1]).sum(axis=1)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=Path, required=True)
    parser.add_argument("--margin", type=float, default=None,
                        help="source pixels every view keeps per output pixel (default: the service's margins)")
    args = parser.parse_args(argv)
    model = create_model("efficientnet_lite0")
    jpegs = sorted(args.files.glob("*.jpg"))
    margin = "the service's margins" if args.margin is None else f"margin {args.margin:g}"
    for policy, samples in (("multiscale", 3), ("crop_flip", 32), ("crop_flip", 10), ("multiscale", 2), ("center", 1)):
        options = EmbedOptions(samples, make_policy(policy), 0)
        cosines, full_s, reduced_s, reductions = [], [], [], []
        for path in jpegs:
            data = path.read_bytes()
            started = time.perf_counter()
            full = embed_file(model, data, options, reduced=False)
            full_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            reduced = embed_file(model, data, options, reduced=True, margin=args.margin)
            reduced_s.append(time.perf_counter() - started)
            reductions.append(decode_reduction(open_image(data, **LIMITS), options, model, margin=args.margin))
            cosines.append(float(full @ reduced))
        worst = jpegs[int(np.argmin(cosines))]
        views = view_cosines(model, worst.read_bytes(), options, args.margin)
        print(f"{policy} S={samples}, {margin}: {len(jpegs)} photos, "
              f"reduction {sorted(set(reductions))}, "
              f"min cosine {min(cosines):.5f} (median {statistics.median(cosines):.5f}); decode+views+forward "
              f"{1000 * statistics.median(full_s):.0f} ms full, {1000 * statistics.median(reduced_s):.0f} ms reduced; "
              f"worst {worst.name}, its views' own cosines {' '.join(f'{c:.5f}' for c in views)}", flush=True)
    options = EmbedOptions(3, make_policy("multiscale"), 0)
    worst = 1.0
    compared = 0
    for path in jpegs:
        stem = path.name.split("-")[0].removesuffix(".jpg")
        variants = [path] + [args.files / f"{stem}.{ext}" for ext in ("heic", "avif", "png")]
        present = [p for p in variants if p.exists()]
        if len(present) < 2:
            continue
        means = [embed_file(model, p.read_bytes(), options, reduced=True) for p in present]
        worst = min([worst] + [float(a @ b) for a, b in itertools.combinations(means, 2)])
        compared += 1
    if compared:
        print(f"same photo as JPEG/HEIC/AVIF/PNG (multiscale S=3, as served): {compared} photos, "
              f"min pairwise cosine {worst:.5f}", flush=True)


if __name__ == "__main__":
    main()
