"""CPU cost of the render stage per view: `render_batch` (cut, resize, flip, normalise) on sample photos.

    python -m bench.render_cost                              # crop_flip S=8, sleep:0's preprocessing
    python -m bench.render_cost --model efficientnet_lite0   # the OpenVINO engine's (planar) input layout

One thread, batches of 4 images × S views, the median of `--repeats` passes over the same jobs (decode and
planning are outside the timing). To compare with another commit, run this file with that commit's checkout
first on PYTHONPATH (`PYTHONPATH=/tmp/other python bench/render_cost.py`): it only uses `render_batch`,
`ImageJob`, `EmbedOptions`, `make_policy`, `decode_image` and `create_model`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from models import create_model
from service.core.decode import decode_image
from service.core.embedding import EmbedOptions, ImageJob, render_batch
from service.core.policies import make_policy
from service.testing import photos


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sleep:0")
    parser.add_argument("--policy", default="crop_flip")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = create_model(args.model)
    pictures = photos(args.images)
    images = [decode_image(data, max_pixels=50_000_000, max_side=20_000) for data in pictures.images]
    options = EmbedOptions(samples=args.samples, policy=make_policy(args.policy), seed=0)

    def one_pass() -> float:
        jobs = [ImageJob(image, options, model) for image in images]
        batches = [[job.take(args.samples) for job in jobs[k : k + 4]] for k in range(0, len(jobs), 4)]
        started = time.perf_counter()
        for chunks in batches:
            render_batch(model, chunks)
        return (time.perf_counter() - started) / (len(jobs) * args.samples)

    seconds = [one_pass() for _ in range(args.repeats)]
    print(f"{args.model} {args.policy} S={args.samples}, {len(images)} {pictures.source} photos: "
          f"{1e6 * statistics.median(seconds):.0f} µs a view (median of {args.repeats}; "
          f"min {1e6 * min(seconds):.0f}, max {1e6 * max(seconds):.0f})")


if __name__ == "__main__":
    main()
