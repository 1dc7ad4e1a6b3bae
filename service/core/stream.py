"""`embed_stream`: the library's batching over an open-ended stream of images, for jobs too big for memory.

`embed()` takes a list and returns when every image is done; a folder of 100,000 photos cannot be
held like that. Here jobs are pulled from an iterator only when a batch has room for their views, and
each image's result is yielded as soon as its last view is reduced, so at most one batch of images
(plus whatever the iterator itself buffers) is alive at a time. The batches are formed exactly as
`embed()` forms them (fill `max_batch_crops` from the oldest unfinished image on) and run through the
same `ImageJob` / `run_chunks` stages, so the numbers are the same as `embed()`'s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import TypeVar

from models import LoadedModel
from service.core.embedding import Chunk, ImageJob, ImageResult, run_chunks
from service.core.options import PolicyError

Key = TypeVar("Key")


def embed_stream(model: LoadedModel, jobs: Iterable[tuple[Key, ImageJob]], *,
                 max_batch_crops: int = 32) -> Iterator[tuple[Key, ImageResult]]:
    """Yield `(key, result)` for every `(key, job)` of `jobs`, in input order, batching their views."""
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
