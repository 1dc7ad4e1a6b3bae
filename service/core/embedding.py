"""The heart of MeTTA: images → S planned views → batched forward → mean (and variance) per image.

`embed()` is the library call the CLI and the evaluation use. The service's batching engine uses
the same pieces — `ImageJob` (one image's pending views and running statistics), `Chunk` (some of
one image's views) and `run_chunks` (render → forward → reduce for one batch) — so the HTTP path
and the library compute exactly the same thing.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from models import LoadedModel
from service.core.decode import OpenedImage, ReducedGeometry
from service.core.options import PolicyError, check_seed, samples_for
from service.core.policies import Policy, View, check_image, make_policy
from service.core.reduce import RunningStats, l2_normalize
from service.core.render import (
    crop_to_views,
    pixel_interleaved,
    render_view,
    render_views_on_device,
    shrink_for_views,
    views_scale,
)

log = logging.getLogger("metta.embedding")


@dataclass(frozen=True)
class EmbedOptions:
    """What one request asks of every one of its images."""

    samples: int
    policy: Policy
    seed: int
    return_variance: bool = False
    normalize: bool = False
    view_normalize: bool = False
    return_dispersion: bool = False

    def __post_init__(self) -> None:
        samples_for(self.policy.name, self.samples, self.samples)
        if self.return_variance and self.samples < 2:
            raise PolicyError("variance needs at least 2 views: ask for samples >= 2 or no variance")
        if self.return_dispersion and self.samples < 2:
            raise PolicyError("dispersion needs at least 2 views: ask for samples >= 2 or no dispersion")
        check_seed(self.seed)


# Source pixels a view keeps per output pixel of it at the reduced scale (see `views_scale`); the antialiased
# resize then does the final filtering. The reduced path's pixels differ from the full decode's a little
# (JPEG's 1/2–1/8 decode is close to a box average, and its own rounding to uint8 is resampled with it); the
# mean of several views averages that out, one view keeps all of it. Measured on the sample photos upscaled to
# 12 MP (docs/benchmarks.md): at 2 source pixels per output pixel the central crop alone fell to cosine 0.9984
# of the full decode; with these margins no photo fell below 0.9990 under any policy (one view: 0.9996).
# Raising either costs CPU wherever it moves a photo to the next finer scale (4× the pixels).
REDUCED_DECODE_MARGIN = 2.5
SINGLE_VIEW_MARGIN = 4.0


def decode_reduction(opened: OpenedImage, options: EmbedOptions, model: LoadedModel, *,
                     margin: float | None = None) -> int:
    """The reduced decode (1/1, 1/2, 1/4, 1/8 per side) an image's views allow: planned on its header's
    upright size, every view keeps at least `margin` times its output size in source pixels (see
    `views_scale`; by default `REDUCED_DECODE_MARGIN`, or `SINGLE_VIEW_MARGIN` for one view; other margins only
    for `bench.reduced_decode`). The views of a larger S include those of a smaller one (plans are
    prefix-stable), so an S not known yet may ask with its upper bound."""
    if margin is None:
        margin = SINGLE_VIEW_MARGIN if options.samples == 1 else REDUCED_DECODE_MARGIN
    views = options.policy.plan(opened.height, opened.width, options.samples, options.seed, model.spec.preprocess)
    return opened.reduction(views_scale(views) * margin)


def decode_job(opened: OpenedImage, options: EmbedOptions, model: LoadedModel, reduction: int, *,
               jpeg_device: torch.device | None = None, icc_to_srgb: bool = True) -> ImageJob:
    """Decode an opened image at `reduction` and plan its views on the full-size picture."""
    image = opened.decode(reduction, jpeg_device=jpeg_device, icc_to_srgb=icc_to_srgb)
    return ImageJob(image, options, model, reduced=opened.reduced_geometry(reduction))


@dataclass
class ImageResult:
    embedding: np.ndarray  # (dim,) float32
    variance: np.ndarray | None  # (dim,) float32, only when asked
    dispersion: float | None = None  # 1 − mean pairwise cosine of the views, only when asked


class ImageJob:
    """One image's planned views, how many have been handed out, and the statistics of those done."""

    def __init__(self, image: torch.Tensor, options: EmbedOptions, model: LoadedModel,
                 reduced: ReducedGeometry | None = None) -> None:
        """`reduced`: where `image`'s pixels lie on the full-size picture when it is a reduced decode of it
        (`decode_reduction`); the views are planned on, and the working copy made of, the full-size picture."""
        check_image(image)
        self.options = options
        height, width = (reduced.height, reduced.width) if reduced else (int(image.shape[1]), int(image.shape[2]))
        self.views: list[View] = options.policy.plan(height, width, options.samples, options.seed,
                                                     model.spec.preprocess)
        self.handed_out = 0
        self.stats = RunningStats(model.dim)
        # The decoded image itself is not kept, only a working copy of the pixels its views read: downscaled
        # once when every view allows it, then cut to the bounding box of the views' boxes.
        working = image if model.device.type == "cuda" else pixel_interleaved(image)
        small, small_views = shrink_for_views(working, self.views, model.spec.preprocess, reduced)
        self.source, self.render_views = crop_to_views(small, small_views)
        if model.device.type == "cuda" and self.source.device.type == "cpu":
            # One host→device copy per image (none when the JPEG was decoded there); views are made on the GPU.
            self.source = self.source.pin_memory().to(model.device, non_blocking=True)

    def keep_first(self, samples: int) -> None:
        """Keep only the first `samples` views (before any is handed out): the plan at that S, as plans are
        prefix-stable. The working copy stays as cut for the longer plan."""
        if self.handed_out:
            raise RuntimeError("views already handed out")
        del self.views[samples:]
        del self.render_views[samples:]

    @property
    def pixels(self) -> int:
        """Pixels held by the working copy (what the service's `max_queue_pixels` budget counts)."""
        return int(self.source.shape[1]) * int(self.source.shape[2])

    @property
    def pending(self) -> int:
        """Views not yet handed out to a batch."""
        return len(self.views) - self.handed_out

    @property
    def done(self) -> bool:
        return self.stats.count == len(self.views)

    def take(self, n: int) -> Chunk:
        """Hand out the next n (or fewer) views as a chunk."""
        start = self.handed_out
        self.handed_out = min(len(self.views), start + n)
        return Chunk(self, self.render_views[start : self.handed_out])

    def add(self, embeddings: np.ndarray) -> None:
        if self.options.view_normalize:
            embeddings = l2_normalize(embeddings)
        self.stats.add(embeddings)

    def result(self) -> ImageResult:
        mean = self.stats.mean
        if self.options.normalize:
            mean = l2_normalize(mean)
        variance = self.stats.variance().astype(np.float32) if self.options.return_variance else None
        dispersion = self.stats.dispersion() if self.options.return_dispersion else None
        return ImageResult(mean.astype(np.float32), variance, dispersion)


@dataclass
class Chunk:
    """Some consecutive views of one image, run in one batch."""

    job: ImageJob
    views: list[View]


@dataclass
class SizeGroup:
    """The views of one batch that share an output size: normalised pixels on the device, and whose they are."""

    size: int
    pixels: torch.Tensor  # (B, 3, size, size) float32, normalised, on the model's device
    places: list[tuple[int, int]]  # row → (chunk index, view index)


@dataclass
class RenderedBatch:
    chunks: list[Chunk]
    groups: list[SizeGroup]


def render_batch(model: LoadedModel, chunks: Sequence[Chunk], map_images: MapImages = map) -> RenderedBatch:
    """Stage 1: the pixels of every view, grouped by output size, normalised, on the model's device.

    Work is done per image (all its views in this batch), and each image's views are written straight
    into their rows of the batch, so no image waits for another and nothing is copied twice. On the CPU
    each view is cut and resized from the image's uint8 working copy (the fastest renderer measured
    there) and normalised into its row while it is still in cache, in the engine's layout. On CUDA the
    views of one image that share a size are made in one batched call on the device
    (`render_views_on_device`), so kernels are launched per image and size, not per view, and each
    group is normalised once. `map_images` may spread the images over a thread pool (torch's resize
    and copies release the GIL).
    """
    by_job: dict[int, _ImageViews] = {}  # id(job) → that image's views in this batch
    for c, chunk in enumerate(chunks):
        image = by_job.setdefault(id(chunk.job), _ImageViews(chunk.job.source))
        for v, view in enumerate(chunk.views):
            image.by_size[view.size].append((c, v))
    images = list(by_job.values())
    places: dict[int, list[tuple[int, int]]] = defaultdict(list)  # size → (chunk, view) per row
    for image in images:  # an image's views of one size fill consecutive rows of that size's group
        for size, pairs in image.by_size.items():
            image.first_row[size] = len(places[size])
            places[size] += pairs
    batches = {size: model.new_batch(len(where), size) for size, where in places.items()}
    on_device = model.device.type == "cuda"
    preprocess = model.spec.preprocess

    def render_image(index: int) -> None:
        image = images[index]
        for size, pairs in image.by_size.items():
            views = [chunks[c].views[v] for c, v in pairs]
            rows = batches[size][image.first_row[size] : image.first_row[size] + len(pairs)]
            if on_device:
                rows.copy_(render_views_on_device(image.source, views, preprocess))
            else:
                for row, view in zip(rows, views, strict=True):
                    model.normalize_into(render_view(image.source, view, preprocess), row)

    for _ in map_images(render_image, list(range(len(images)))):
        pass
    groups = []
    for size, pixels in batches.items():
        if on_device:
            pixels = model.normalize_float(pixels)
        groups.append(SizeGroup(size, pixels, places[size]))
    return RenderedBatch(list(chunks), groups)


@dataclass
class _ImageViews:
    """One image's views in a batch: (chunk index, view index) per view by output size, and the first row
    they fill in that size's group."""

    source: torch.Tensor
    by_size: dict[int, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    first_row: dict[int, int] = field(default_factory=dict)


MapImages = Callable[[Callable[[int], None], list[int]], Iterable[None]]


def forward_batch(model: LoadedModel, rendered: RenderedBatch,
                  skip: Callable[[Chunk], bool] | None = None) -> list[np.ndarray | None]:
    """Stage 2: one forward call per output size; each chunk's embeddings (None for skipped chunks).

    `skip` names chunks nobody waits for any more (their request was abandoned after rendering): their
    rows are dropped before the forward. Out of memory on a group of two or more views: the cache is
    emptied and the group runs once more as two halves.
    """
    chunks = rendered.chunks
    keep = [skip is None or not skip(chunk) for chunk in chunks]
    outputs: list[np.ndarray | None] = [
        np.empty((len(chunk.views), model.dim), dtype=np.float32) if kept else None
        for chunk, kept in zip(chunks, keep, strict=True)]
    for group in rendered.groups:
        rows = [row for row, (c, _) in enumerate(group.places) if keep[c]]
        if not rows:
            continue
        pixels = group.pixels if len(rows) == len(group.places) else group.pixels[rows]
        embedded = _forward_splitting_on_oom(model, pixels)
        for out_row, row in enumerate(rows):
            c, v = group.places[row]
            target = outputs[c]
            assert target is not None
            target[v] = embedded[out_row]
    return outputs


def _forward_splitting_on_oom(model: LoadedModel, pixels: torch.Tensor) -> np.ndarray:
    try:
        return model.forward(pixels).numpy()
    except Exception as exc:
        if not is_out_of_memory(exc) or pixels.shape[0] < 2:
            raise
        log.warning("out of memory on %d crops: retrying once as two halves", pixels.shape[0])
        model.empty_cache()
        half = pixels.shape[0] // 2
        return np.concatenate([model.forward(pixels[:half]).numpy(), model.forward(pixels[half:]).numpy()])


def is_out_of_memory(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def reduce_batch(rendered: RenderedBatch, outputs: Sequence[np.ndarray | None]) -> None:
    """Stage 3: merge each chunk's view embeddings into its image's running statistics.

    Only called once every forward of the batch succeeded, so a failing batch leaves each job as it
    was (its views are never half-added).
    """
    for chunk, output in zip(rendered.chunks, outputs, strict=True):
        if output is not None:
            chunk.job.add(output)


def run_chunks(model: LoadedModel, chunks: Sequence[Chunk]) -> None:
    """Render, forward and reduce one batch in this thread (the library path; the engine overlaps them)."""
    rendered = render_batch(model, chunks)
    reduce_batch(rendered, forward_batch(model, rendered))


@dataclass
class EmbedResult:
    embeddings: np.ndarray  # (N, dim) float32
    variances: np.ndarray | None  # (N, dim) float32 when asked
    dispersions: np.ndarray | None = None  # (N,) float64 when asked


def embed(
    model: LoadedModel,
    images: Sequence[torch.Tensor],
    *,
    samples: int,
    policy: Policy | str = "crop_flip",
    seed: int = 0,
    return_variance: bool = False,
    normalize: bool = False,
    view_normalize: bool = False,
    return_dispersion: bool = False,
    max_batch_crops: int = 32,
) -> EmbedResult:
    """Mean embeddings of decoded uint8 (3, H, W) images over `samples` views each."""
    if isinstance(policy, str):
        policy = make_policy(policy)
    if max_batch_crops < 1:
        raise PolicyError(f"max_batch_crops must be at least 1, got {max_batch_crops}")
    if len(images) == 0:
        raise PolicyError("no images given")
    options = EmbedOptions(samples, policy, seed, return_variance, normalize, view_normalize, return_dispersion)
    jobs = ((index, ImageJob(image, options, model)) for index, image in enumerate(images))
    results = [result for _, result in embed_stream(model, jobs, max_batch_crops=max_batch_crops)]
    embeddings = np.stack([r.embedding for r in results])
    variances = np.stack([r.variance for r in results if r.variance is not None]) if return_variance else None
    dispersions = np.array([r.dispersion for r in results]) if return_dispersion else None
    return EmbedResult(embeddings, variances, dispersions)


Key = TypeVar("Key")


def embed_stream(model: LoadedModel, jobs: Iterable[tuple[Key, ImageJob]], *,
                 max_batch_crops: int = 32) -> Iterator[tuple[Key, ImageResult]]:
    """Yield `(key, result)` for every `(key, job)` of `jobs`, in input order, batching their views.

    The library's one batching loop (`embed` runs its list through it; `metta embed` a folder of any size).
    Jobs are pulled only when a batch has room for their views, and each result is yielded once its last
    view is reduced, so at most about one batch of images is alive at a time.
    """
    if max_batch_crops < 1:
        raise PolicyError(f"max_batch_crops must be at least 1, got {max_batch_crops}")
    source = iter(jobs)
    waiting: deque[tuple[Key, ImageJob]] = deque()  # views not all handed out yet (at most one, the oldest)
    running: deque[tuple[Key, ImageJob]] = deque()  # every view handed out, not all reduced yet
    exhausted = False
    while True:
        batch: list[Chunk] = []
        room = max_batch_crops
        while room > 0:
            if not waiting:
                item = None if exhausted else next(source, None)
                if item is None:
                    exhausted = True
                    break
                waiting.append(item)
            job = waiting[0][1]
            chunk = job.take(room)
            room -= len(chunk.views)
            batch.append(chunk)
            if job.pending == 0:
                running.append(waiting.popleft())
        if not batch:
            return
        run_chunks(model, batch)
        # Jobs finish in the order their views were handed out, so the finished ones are a prefix.
        while running and running[0][1].done:
            key, job = running.popleft()
            yield key, job.result()
