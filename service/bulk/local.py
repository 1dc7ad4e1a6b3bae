"""A bulk run in this process: read + hash + decode + plan in a pool of threads, feeding the library's batching.

Memory stays bounded whatever the number of files: the pool works at most `ahead` files in front of
the model (each a small working copy once planned; the decoded pixels, at the reduced scale its views
allow, only while a worker decodes), and results leave for the dataset as soon as each image is done
(`embed_stream`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from models import LoadedModel
from service.bulk.dataset import Dataset, ErrorLog, Row
from service.bulk.files import InputFile, display_path
from service.bulk.progress import Progress
from service.bulk.sources import is_uri, read_source
from service.core.decode import open_image
from service.core.embedding import EmbedOptions, ImageJob, decode_job, decode_reduction, embed_stream
from service.core.errors import ServiceError
from service.core.options import PolicyError

T = TypeVar("T")
R = TypeVar("R")
READ_THREADS = 8  # objects read at once from a store: each answers in milliseconds, a decoder should not wait


@dataclass
class Prepared:
    """One input file after the pool: a job to run, a reason it is bad, or already in the dataset."""

    path: str
    sha256: str = ""
    job: ImageJob | None = None
    error: tuple[str, str] | None = None  # (type, message)


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int
    max_side: int
    max_bytes: int  # a file is read only up to the server's body limit


def run_local(files: list[str], dataset: Dataset, errors: ErrorLog, progress: Progress, *, model: LoadedModel,
              options: EmbedOptions, limits: DecodeLimits, workers: int, max_batch_crops: int) -> None:
    known = dict(dataset.known)  # a snapshot: the pool's threads read it while the dataset grows
    pool = ThreadPoolExecutor(workers, thread_name_prefix="metta-embed-decode")
    try:
        def jobs() -> Iterator[tuple[Prepared, ImageJob]]:
            for item in prepare_files(files, known, model, options, limits, pool=pool, ahead=4 * workers):
                if item.job is not None:
                    yield item, item.job
                elif item.error is not None:
                    errors.add(item.path, *item.error)
                    progress.add_bad()
                else:
                    progress.add_already()

        for item, result in embed_stream(model, jobs(), max_batch_crops=max_batch_crops):
            dataset.add(Row(item.path, item.sha256, result.embedding, result.variance, result.dispersion))
            progress.add_embedded()
    finally:
        # On Ctrl-C: files not started are dropped; the ones being decoded finish in the background.
        pool.shutdown(wait=False, cancel_futures=True)


def prepare_files(files: Sequence[str], known: Mapping[str, str], model: LoadedModel, options: EmbedOptions,
                  limits: DecodeLimits, *, pool: ThreadPoolExecutor, ahead: int) -> Iterator[Prepared]:
    """Each file read, hashed and (unless the dataset has it as it is now) decoded and planned on `pool`, at
    most `ahead` in front, in input order.

    Objects in a store (URIs) are read on READ_THREADS threads of their own, up to 2 x READ_THREADS ahead of
    the decoders (their bytes held meanwhile), so a request's round trip never holds a decoding thread.
    Local files are read by the decoding thread itself: a read from disk or the page cache is quick."""
    if not any(is_uri(path) for path in files):
        yield from ordered_map(pool, lambda path: prepared(read_source(path, known, limits.max_bytes), model,
                                                            options, limits), files, ahead=ahead)
        return
    readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="metta-embed-read")
    try:
        reads = ordered_map(readers, lambda path: read_source(path, known, limits.max_bytes), files,
                            ahead=2 * READ_THREADS)
        yield from ordered_map(pool, lambda read: prepared(read, model, options, limits), reads, ahead=ahead)
    finally:
        readers.shutdown(wait=False, cancel_futures=True)


def prepared(read: InputFile, model: LoadedModel, options: EmbedOptions, limits: DecodeLimits) -> Prepared:
    """A file as read: why it is bad, already in the dataset (no bytes), or decoded and planned."""
    if read.data is None:
        return Prepared(read.path, read.sha256, error=read.error)
    return prepare_bytes(read.path, read.sha256, read.data, model, options, limits)


def prepare_bytes(path: str, sha256: str, data: bytes, model: LoadedModel, options: EmbedOptions,
                  limits: DecodeLimits) -> Prepared:
    """Decode the image at the scale its views need and plan them, or say why it is bad (every runner's step
    from an input's bytes to a job)."""
    try:
        image = open_image(data, max_pixels=limits.max_pixels, max_side=limits.max_side, label=display_path(path))
        job = decode_job(image, options, model, decode_reduction(image, options, model))
        return Prepared(path, sha256, job=job)
    except ServiceError as exc:
        return Prepared(path, sha256, error=(exc.type, exc.message))
    except PolicyError as exc:
        return Prepared(path, sha256, error=("invalid_image", f"{display_path(path)}: {exc}"))


def ordered_map(pool: ThreadPoolExecutor, work: Callable[[T], R], items: Iterable[T], *,
                      ahead: int) -> Iterator[R]:
    """work(item) for every item on the pool, in input order, with at most `ahead` submitted and not yet taken."""
    window: deque[Future[R]] = deque()
    for item in items:
        window.append(pool.submit(work, item))
        if len(window) >= ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()
