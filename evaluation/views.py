"""Per-view embeddings: every view of a policy's plan for S_max views, embedded once and cached.

Smaller S are prefixes of the same plan (policies are prefix-stable), so one (N, S_max, dim) array
gives every S of a study. Planning, the one-off downscale and rendering are the library's own
(`ImageJob`, `render_view`): a row's mean is what `embed(samples=S_max)` returns for that image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from models import LoadedModel
from service.core.embedding import EmbedOptions, ImageJob
from service.core.policies import Policy, View
from service.core.render import render_view

log = logging.getLogger("metta.eval")

ImageLoader = Callable[[int], torch.Tensor]  # image index → decoded uint8 (3, H, W)


def embed_per_view(model: LoadedModel, count: int, load: ImageLoader, policy: Policy, samples: int, seed: int,
                   *, batch_crops: int = 64) -> np.ndarray:
    """(count, samples, dim) float32: view s of image i under the policy's plan for `samples` views.

    Identical views (multiscale cycles its few sizes) are embedded once and copied.
    """
    out = np.empty((count, samples, model.dim), dtype=np.float32)
    pending: dict[int, list[tuple[int, list[int], torch.Tensor]]] = defaultdict(list)  # size → work
    started, crops = time.perf_counter(), 0

    def flush(size: int) -> None:
        nonlocal crops
        work = pending.pop(size, [])
        if not work:
            return
        embedded = model.embed_views(torch.stack([pixels for _, _, pixels in work])).numpy()
        for row, (image_index, slots, _) in enumerate(work):
            out[image_index, slots] = embedded[row]
        crops += len(work)

    for i in range(count):
        job = ImageJob(load(i), EmbedOptions(samples, policy, seed), model)
        slots: dict[View, list[int]] = defaultdict(list)  # a distinct view → the plan positions using it
        for s, view in enumerate(job.render_views):
            slots[view].append(s)
        for view, positions in slots.items():
            pending[view.size].append((i, positions, render_view(job.source, view, model.spec.preprocess)))
            if len(pending[view.size]) >= batch_crops:
                flush(view.size)
        if (i + 1) % 50 == 0:
            elapsed = time.perf_counter() - started
            log.info("  %s S=%d: %d/%d images, %d crops, %.1f crops/s", policy.name, samples, i + 1, count,
                     crops, crops / max(elapsed, 1e-9))
    for size in list(pending):
        flush(size)
    return out


def cache_key(model: LoadedModel, image_ids: Sequence[str], policy: Policy, samples: int, seed: int) -> str:
    """Same key ⇔ same model numerics, images, policy config, S and seed."""
    payload = json.dumps({"model": model.fingerprint, "images": list(image_ids), "policy": repr(policy),
                          "samples": samples, "seed": seed})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached_per_view(model: LoadedModel, image_ids: Sequence[str], load: ImageLoader, policy: Policy, samples: int,
                    seed: int, cache_dir: Path | None, *, batch_crops: int = 64) -> np.ndarray:
    """`embed_per_view`, read from `cache_dir` when an identical run was made before (then no image is decoded)."""
    path = None
    if cache_dir is not None:
        path = cache_dir / f"{policy.name}-S{samples}-{cache_key(model, image_ids, policy, samples, seed)}.npy"
        if path.is_file():
            cached: np.ndarray = np.load(path)
            return cached
        larger = _cached_prefix(model, image_ids, policy, samples, seed, cache_dir)
        if larger is not None:
            return larger
    log.info("embedding %d images × %d views (%r, seed %d)", len(image_ids), samples, policy, seed)
    views = embed_per_view(model, len(image_ids), load, policy, samples, seed, batch_crops=batch_crops)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, views)
        tmp.replace(path)  # a run killed mid-write leaves no half file under the real name
    return views


def _cached_prefix(model: LoadedModel, image_ids: Sequence[str], policy: Policy, samples: int, seed: int,
                   cache_dir: Path) -> np.ndarray | None:
    """The first `samples` views of a cached run of the same plan with more views, if there is one."""
    for path in sorted(cache_dir.glob(f"{policy.name}-S*-*.npy")):
        s_text, key = path.stem.split("-")[-2:]
        more = int(s_text[1:])
        if more > samples and key == cache_key(model, image_ids, policy, more, seed):
            views: np.ndarray = np.load(path, mmap_mode="r")[:, :samples]
            return np.ascontiguousarray(views)
    return None
