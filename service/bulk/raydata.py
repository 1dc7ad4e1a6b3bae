"""A bulk run on a Ray cluster (`metta embed ... --ray [ADDRESS]`), and `embed_dataset` for a Ray Dataset of images.

The job on Ray Data: listing is a Ray task; the paths are a Ray Dataset that `map_batches` hands to an actor
pool, one loaded model per actor (`num_gpus=1` each where the cluster has GPUs, CPU actors with a set thread
count otherwise). Each actor reads, hashes and decodes its batch's files on a few threads (the local run's
`prepare_files`, object storage included) while its model embeds the ones decoded before (`embed_stream`), so
an image's bytes never travel through the object store; the rows stream back to the driver, which commits
them into the dataset a local run writes (dataset.py: the same columns, `metta.*` metadata, errors file,
parts renamed into place, resume).

Every input exactly once, by construction rather than by luck:
- each listed input is one row of the Ray Dataset, carrying the sha256 the output already holds for its path,
  so an actor knows by itself what to skip;
- the driver is the dataset's only writer: parts get consecutive names and are renamed into place when
  complete, so a retried task on a lost node never writes a part of its own;
- a row whose input the driver has already taken (a retried task delivering again) is dropped on commit;
- at the end every listed input must have come back (embedded, already present, or bad); one that did not
  ends the run with exit 1, never a silent skip.
Ray's own retries (tasks retried, actors restarted, lost objects rebuilt from their lineage) handle a lost
worker or node. A killed driver ends its job; the next run resumes from the parts on disk, as a local run does.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from models import ModelOptions
from service.bulk.dataset import Dataset, ErrorLog, Row
from service.bulk.files import Inputs, UsageError
from service.bulk.local import DecodeLimits, Prepared, ordered_map, prepare_bytes, prepare_files
from service.bulk.progress import Progress
from service.bulk.sources import find_inputs, is_uri
from service.core.embedding import ImageJob, embed_stream
from service.settings import Settings

_DEFAULTS = Settings.model_fields
EMBED_BATCH = 32  # images per call of an actor: each call ends by draining its decode-ahead, so not too few
DECODE_THREADS = 2  # per actor: reading and decoding the next images while its model runs
TASKS_PER_ACTOR = 2  # calls queued at an actor: the next batch is there when one ends, and the run's tail is short


class Incomplete(Exception):
    """Some inputs never came back from the cluster: exit 1 (the next run embeds them)."""


class Unreachable(Exception):
    """Nothing answers at the cluster's address: exit 1."""


CONNECT_TIMEOUT_S = 3.0  # as for --server: an address where nothing answers fails the run at once


@dataclass(frozen=True)
class EmbedSpec:
    """What an actor needs to build its model and embed, as plain picklable values."""

    model: str
    model_options: ModelOptions = field(default_factory=ModelOptions)
    policy: str = str(_DEFAULTS["default_policy"].default)
    samples: int = int(_DEFAULTS["default_samples"].default)
    seed: int = 0
    normalize: bool = False
    variance: bool = False
    dispersion: bool = False
    limits: DecodeLimits = field(default_factory=lambda: DecodeLimits(int(_DEFAULTS["max_image_pixels"].default),
                                                                      int(_DEFAULTS["max_image_side"].default),
                                                                      int(_DEFAULTS["max_body_bytes"].default)))
    max_batch_crops: int = 32


@dataclass(frozen=True)
class Placement:
    """How many actors, and what each holds: one GPU, or `threads` CPUs (its model's intra-op threads)."""

    actors: int
    gpus: int = 0  # per actor: 0 or 1
    threads: int = 1

    @staticmethod
    def for_cluster(actors: int | None, threads: int | None) -> Placement:
        """One actor per GPU where the cluster has GPUs; else CPU actors of `threads` threads filling its CPUs."""
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        threads = threads or 1
        if gpus:
            return Placement(actors or gpus, 1, threads)
        return Placement(actors or max(1, int(resources.get("CPU", 1)) // threads), 0, threads)


class ImageEmbedder:
    """Ray Data's callable class for `map_batches`: one model per actor, images in, embedding columns out.

    `column` holds each image's encoded bytes; or, with `reads_files`, each input's path or URI (as the bytes
    of its name) and the actor reads and hashes it itself, as the local run does (`prepare_files`: a `sha256`
    column is added, and an input whose `have_sha256` is its hash is not decoded: no embedding, no error; and
    `ready_at`, the actor's clock when its model had loaded, for the run's summary).
    Reading and decoding run on a few threads of the actor while its model embeds the images decoded before
    (`ordered_map` feeding `embed_stream`), as in the local run.
    """

    def __init__(self, spec: EmbedSpec, column: str, label_column: str | None = None,
                 fingerprint: str | None = None, decode_threads: int = DECODE_THREADS,
                 reads_files: bool = False) -> None:
        from models import create_model
        from service.core.embedding import EmbedOptions
        from service.core.policies import make_policy

        self.model = create_model(spec.model, spec.model_options)
        if fingerprint is not None and self.model.fingerprint != fingerprint:
            raise RuntimeError(f"this actor's model is {self.model.fingerprint}, the run's is {fingerprint}: "
                               "every node must run the same image (weights, engine, device)")
        self.spec = spec
        self.column = column
        self.label_column = label_column
        self.reads_files = reads_files
        self.options = EmbedOptions(spec.samples, make_policy(spec.policy), spec.seed,
                                    return_variance=spec.variance, normalize=spec.normalize,
                                    return_dispersion=spec.dispersion)
        self.pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="metta-ray-decode")
        self.ahead = 4 * decode_threads
        self.ready_at = time.time()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, spec, model = batch.num_rows, self.spec, self.model
        kinds = _strings(batch, "error_type", rows)
        messages = _strings(batch, "error", rows)
        hashes = [""] * rows
        items: Iterator[Prepared]
        if self.reads_files:
            paths = [_text(path) for path in batch.column(self.column).to_pylist()]
            known = {path: have for path, have in zip(paths, batch.column("have_sha256").to_pylist(), strict=True)
                     if have}
            todo = [i for i in range(rows) if not kinds[i]]
            items = prepare_files([paths[i] for i in todo], known, model, self.options, spec.limits,
                                  pool=self.pool, ahead=self.ahead)
        else:
            data = batch.column(self.column).to_pylist()
            labels = ([_text(label) for label in batch.column(self.label_column).to_pylist()] if self.label_column
                      else [f"row {i}" for i in range(rows)])

            def prepare(index: int) -> Prepared:
                return prepare_bytes(labels[index], "", data[index], model, self.options, spec.limits)

            todo = [i for i in range(rows) if data[i] is not None and not kinds[i]]
            items = ordered_map(self.pool, prepare, todo, ahead=self.ahead)

        def jobs() -> Iterator[tuple[int, ImageJob]]:
            for index, item in zip(todo, items, strict=True):
                hashes[index] = item.sha256
                if item.job is not None:
                    yield index, item.job
                elif item.error is not None:
                    kinds[index], messages[index] = item.error

        results = dict(embed_stream(model, jobs(), max_batch_crops=spec.max_batch_crops))
        dim = model.dim
        embedded = np.array([i in results for i in range(rows)])
        columns: dict[str, pa.Array] = {}
        if self.reads_files:
            columns["sha256"] = pa.array(hashes, pa.string())
            columns["ready_at"] = pa.array([self.ready_at] * rows, pa.float64())
        columns["embedding"] = _vector_column([r.embedding for r in results.values()], embedded, dim)
        if spec.variance:
            columns["variance"] = _vector_column([r.variance for r in results.values()], embedded, dim)
        if spec.dispersion:
            columns["dispersion"] = pa.array([results[i].dispersion if i in results else None for i in range(rows)],
                                             pa.float64())
        columns["error_type"] = pa.array(kinds, pa.string())
        columns["error"] = pa.array(messages, pa.string())
        for name, column in columns.items():
            if name in batch.column_names:
                batch = batch.drop_columns([name])
            batch = batch.append_column(name, column)
        return batch


def embed_dataset(ds: ray.data.Dataset, *, column: str = "bytes", model: str = str(_DEFAULTS["model"].default),
                  policy: str = str(_DEFAULTS["default_policy"].default),
                  samples: int = int(_DEFAULTS["default_samples"].default), seed: int = 0,
                  normalize: bool = False, variance: bool = False, dispersion: bool = False,
                  model_options: ModelOptions | None = None, actors: int = 1, num_gpus: int = 0,
                  threads: int = 1, label_column: str | None = None, batch_size: int = EMBED_BATCH,
                  fingerprint: str | None = None) -> ray.data.Dataset:
    """`ds` with the embedding columns added, computed on an actor pool of `actors` (one model each).

    `column` holds each image's encoded bytes (a null passes through untouched). Added: `embedding`
    (fixed_size_list<float32>[dim]; null where the image could not be embedded), `variance` and `dispersion`
    when asked, `error_type` and `error` (null, or why the image was refused: `invalid_image`, ...). Rows
    whose `error_type` is already set are passed through. With `num_gpus=1` each actor holds one GPU and
    its model runs there; otherwise each holds `threads` CPUs and its model uses as many threads. The
    embeddings are `embed_stream`'s (the library's, the server's), to float32 rounding.
    """
    options = model_options or ModelOptions(device="cuda" if num_gpus else "cpu", threads=None if num_gpus else threads)
    spec = EmbedSpec(model, options, policy, samples, seed, normalize, variance, dispersion)
    return _embed_on_actors(ds, spec, Placement(actors, num_gpus, threads), column=column, label_column=label_column,
                            batch_size=batch_size, fingerprint=fingerprint)


def _embed_on_actors(ds: ray.data.Dataset, spec: EmbedSpec, placement: Placement, *, column: str,
                     label_column: str | None, batch_size: int = EMBED_BATCH, fingerprint: str | None = None,
                     reads_files: bool = False) -> ray.data.Dataset:
    return ds.map_batches(ImageEmbedder, fn_constructor_kwargs={"spec": spec, "column": column,
                                                                "label_column": label_column,
                                                                "fingerprint": fingerprint,
                                                                "reads_files": reads_files},
                          batch_size=batch_size, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=placement.actors,
                                                             max_tasks_in_flight_per_actor=TASKS_PER_ACTOR),
                          num_gpus=placement.gpus or None, num_cpus=0 if placement.gpus else placement.threads)


# ---------------------------------------------------------------------------------------------- the bulk job

def disconnect() -> None:
    ray.shutdown()


def connect(address: str | None) -> None:
    """Join the cluster at `address` (None: $RAY_ADDRESS, else a new one-machine cluster); quiet logs."""
    _answers_or_raise(address or os.environ.get("RAY_ADDRESS"))
    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING", include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UsageError(f"--ray {address or '(local)'}: {exc}") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the run's own bar and summary line say how far it is
    context.print_on_execution_start = False
    context.execution_options.preserve_order = False


def _answers_or_raise(address: str | None) -> None:
    """Unreachable unless something accepts a connection at a HOST:PORT (or ray://HOST:PORT) address within
    CONNECT_TIMEOUT_S: ray.init itself waits minutes for a dead address (5.5 min measured), then exits 15."""
    host, colon, port = (address or "").removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return  # no address, "auto", "local": Ray finds or starts the cluster itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise Unreachable(f"--ray {address}: nothing answers there ({exc.strerror or exc}); "
                          "is the cluster's head running?") from None


def list_on_cluster(arguments: Sequence[str], pattern: str | None, listings: Sequence[str]) -> Inputs:
    """find_inputs as a Ray task (a shared folder or a bucket as the cluster sees it, not only the driver).

    Relative local paths are made absolute first: a Ray worker's working directory is not the caller's."""
    arguments = [a if is_uri(a) else os.path.abspath(a) for a in arguments]
    listings = [a if is_uri(a) else os.path.abspath(a) for a in listings]
    task = ray.remote(num_cpus=0)(find_inputs)
    try:
        inputs = ray.get(task.remote(arguments, pattern, listings, cwd=os.getcwd()))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UsageError):
            raise exc.cause from None
        raise
    assert isinstance(inputs, Inputs)
    return inputs


def describe_model(spec: EmbedSpec, placement: Placement) -> tuple[str, str, int, int]:
    """(name, fingerprint, dim, input size) of the model as the actors load it (on their device), for the
    dataset's metadata and the option checks."""
    task = ray.remote(num_gpus=placement.gpus or None, num_cpus=0 if placement.gpus else placement.threads)(_describe)
    name, fingerprint, dim, input_size = ray.get(task.remote(spec))
    return str(name), str(fingerprint), int(dim), int(input_size)


def _describe(spec: EmbedSpec) -> tuple[str, str, int, int]:
    from models import create_model

    model = create_model(spec.model, spec.model_options)
    return model.name, model.fingerprint, model.dim, model.spec.preprocess.input_size


def run_ray(files: list[str], dataset: Dataset, errors: ErrorLog, progress: Progress, *, spec: EmbedSpec,
            placement: Placement) -> None:
    """Embed `files` on the cluster into `dataset` (opened: its `known` says what to skip)."""
    if not files:
        return
    # Paths travel as the bytes of the name (a name that is not UTF-8 is not an Arrow string).
    inputs = pa.table({"path": pa.array([os.fsencode(path) for path in files], pa.binary()),
                       "have_sha256": pa.array([dataset.known.get(path, "") for path in files], pa.string())})
    # Blocks of whole actor batches (one block is one actor task): at least 8 per actor, so that the actors
    # share the work evenly to the end, and at most 32 batches each, so that a catalogue of millions is not
    # millions of tasks. (A task lost with its node is retried by Ray, up to its default 3 times.)
    batches = max(1, min(32, math.ceil(len(files) / (8 * placement.actors * EMBED_BATCH))))
    rows_per_block = batches * EMBED_BATCH
    blocks = [inputs.slice(start, rows_per_block) for start in range(0, len(files), rows_per_block)]
    ds = _embed_on_actors(ray.data.from_arrow(blocks), spec, placement, column="path", label_column=None,
                          fingerprint=dataset.run.model_fingerprint, reads_files=True)
    # No operator after the actors: one would need a CPU of its own, and the actors hold them all.
    seen: set[str] = set()
    began, first_ready = time.time(), math.inf
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        first_ready = min(first_ready, pc.min(batch.column("ready_at")).as_py())
        commit(batch, seen, dataset, errors, progress)
    if first_ready < math.inf:
        # As a local run's rate counts from after its model loaded, this one counts from its first actor's.
        progress.count_from(first_ready)
        print(f"metta embed: the first of {placement.actors} actors was ready {first_ready - began:.1f} s after the "
              "job began (its process, imports and model load); the rate counts from then", file=sys.stderr)
    missing = len(files) - len(seen)
    if missing:
        raise Incomplete(f"{missing} of {len(files)} inputs never came back from the cluster; run again to embed them")


def commit(batch: pa.Table, seen: set[str], dataset: Dataset, errors: ErrorLog, progress: Progress) -> None:
    """The driver's side: each input's row into the dataset (or the errors file) once; repeats are dropped."""
    paths = [os.fsdecode(path) for path in batch.column("path").to_pylist()]
    hashes = batch.column("sha256").to_pylist()
    kinds = batch.column("error_type").to_pylist()
    messages = batch.column("error").to_pylist()
    embeddings = vectors(batch.column("embedding"))
    variances = vectors(batch.column("variance")) if dataset.run.variance else None
    dispersions = batch.column("dispersion").to_pylist() if dataset.run.dispersion else None
    for i, path in enumerate(paths):
        if path in seen:
            continue  # delivered again by a retried task: already committed
        seen.add(path)
        if kinds[i]:
            errors.add(path, kinds[i], messages[i] or "")
            progress.add_bad()
        elif (embedding := embeddings[i]) is None:
            progress.add_already()
        else:
            dataset.add(Row(path, hashes[i], embedding, variances[i] if variances else None,
                            dispersions[i] if dispersions else None))
            progress.add_embedded()


def vectors(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    """A fixed_size_list<float32> column as one (dim,) array per row, None where null."""
    out: list[np.ndarray | None] = []
    for chunk in column.chunks:
        out.extend(None if item is None else np.asarray(item, np.float32)
                   for item in chunk.to_numpy(zero_copy_only=False))
    return out


def _text(label: str | bytes | None) -> str:
    return os.fsdecode(label) if isinstance(label, bytes) else str(label)


def _strings(batch: pa.Table, name: str, rows: int) -> list[str | None]:
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * rows


def _vector_column(vectors: list[np.ndarray | None], present: np.ndarray, dim: int) -> pa.Array:
    """(dim,) vectors for the rows where `present`, nulls elsewhere, as fixed_size_list<float32>[dim]."""
    full = np.zeros((len(present), dim), np.float32)
    if vectors:
        full[present] = np.stack([v for v in vectors if v is not None])
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1), pa.float32()), dim,
                                             mask=pa.array(~present))
