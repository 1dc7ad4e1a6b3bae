"""`metta embed PATH... [--out OUT.npy | OUT.parquet]`: options → model (or server) → output; the summary line
and the exit code.

Options are checked against the model and the limits the server applies (the `max_samples` setting, the
policy's distinct views at the model's input size: `core.policies.check_samples`) before any file is
read, so a bad option is one message and exit 2, never a bad mark on every image. With --server they are
the server's own, from GET /v1/models: its max_samples, its model's input size, and the policy and S a
request that names none gets there.

Exit codes, the same for every output (.npy and .parquet):
  0    the run completed (also when everything was already there, or bad files were skipped)
  1    nothing could be embedded (every file bad; with .npy, any bad file), the server or the Ray cluster
       could not be reached or kept failing, or the output could not be written (a full disk); the rows
       written are kept
  2    usage: bad options or flags, no input found, settings that do not match the existing dataset, or
       another run writing the same --out; nothing was read or written
  130  Ctrl-C (finished parts kept)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from service.bulk.dataset import PART_ROWS, Dataset, ErrorLog, OutputError, RunSettings, errors_path
from service.bulk.files import Inputs, UsageError, display_path, read_input
from service.bulk.lock import output_lock
from service.bulk.progress import Progress
from service.bulk.sources import find_inputs
from service.core.options import PolicyError, check_seed, samples_for
from service.settings import Settings

if TYPE_CHECKING:
    from models import LoadedModel
    from service.client import Limits

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130
SERVER_CONNECT_TIMEOUT_S = 3.0  # a --server that does not answer within this fails the run at once


def add_bulk_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--glob", default=None, help="only files below a folder whose path or name matches")
    parser.add_argument("--workers", type=int, default=None, help="decode threads (default: the CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="start the dataset over")
    parser.add_argument("--dispersion", action="store_true", help="also write each image's view dispersion")
    parser.add_argument("--server", default=None, metavar="URL", help="embed with a running metta-serve")
    parser.add_argument("--api-key-file", type=Path, default=None, help="the server's API key, in a file")
    parser.add_argument("--images-per-request", type=int, default=None,
                        help="with --server: images per request (default: the server's limit)")
    parser.add_argument("--concurrency", type=int, default=4, help="with --server: requests in flight")
    parser.add_argument("--part-rows", type=int, default=PART_ROWS,
                        help=f"rows per part file, 1 to {PART_ROWS} (a kill redoes at most one part)")
    parser.add_argument("--list", action="append", default=None, metavar="FILE",
                        help="a listing of inputs: .txt (one per line), .csv or .parquet (a `path` column)")
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run on a Ray cluster (ADDRESS, else $RAY_ADDRESS, else a new local one); "
                             "needs metta-serve[ray]")
    parser.add_argument("--actors", type=int, default=None,
                        help="with --ray: model actors (default: one per GPU, else the CPUs / --actor-threads)")
    parser.add_argument("--actor-threads", type=int, default=None,
                        help="with --ray on CPUs: threads (and CPUs reserved) per actor (default 1)")


_DATASET_ONLY = ("glob", "workers", "server", "api_key_file", "images_per_request", "dispersion", "overwrite", "list",
                 "ray", "actors", "actor_threads")


def writes_dataset(args: argparse.Namespace) -> bool:
    """A Parquet dataset unless --out is missing or ends in .npy (today's in-memory path, for small jobs).

    A dataset-only flag also means this path, where the command asks for a dataset --out."""
    wants_dataset = any(getattr(args, name) not in (None, False) for name in _DATASET_ONLY)
    return wants_dataset or (args.out is not None and args.out.suffix.lower() != ".npy")


def embed_command(args: argparse.Namespace) -> int:
    """Run `metta embed`; returns the exit code (the table above)."""
    try:
        return dataset_command(args) if writes_dataset(args) else _array_command(args)
    except (UsageError, PolicyError) as exc:
        print(f"metta embed: {exc}", file=sys.stderr)
        return USAGE
    except OutputError as exc:
        print(f"metta embed: {exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        return INTERRUPTED


def dataset_command(args: argparse.Namespace) -> int:
    if args.out is None or args.out.suffix.lower() == ".npy":
        flags = [f"--{name.replace('_', '-')}" for name in _DATASET_ONLY if getattr(args, name) not in (None, False)]
        raise UsageError(f"{', '.join(flags)} need a dataset: --out OUT.parquet")
    settings = _settings(args)
    workers = args.workers or settings.decode_workers
    if workers < 1 or args.concurrency < 1 or (args.images_per_request or 1) < 1:
        raise UsageError("--workers, --concurrency and --images-per-request must be at least 1")
    if not 1 <= args.part_rows <= PART_ROWS:
        raise UsageError(f"--part-rows must be in [1, {PART_ROWS}]")
    if (args.actors or 1) < 1 or (args.actor_threads or 1) < 1:
        raise UsageError("--actors and --actor-threads must be at least 1")
    if not args.images and not args.list:
        raise UsageError("nothing to embed: name files, folders, globs or URIs, or --list FILE")
    if args.ray is not None and args.server is not None:
        raise UsageError("--ray and --server are two ways to run the job: choose one")
    out = Path(args.out)
    if args.server is None:  # with --server, the options are checked against the server's defaults and limits
        policy, samples = _views(args, ViewDefaults.of(settings), input_size=None)
    with output_lock(out):  # before anything slow: a server asked, a model loaded, a cluster joined
        if args.server is not None:
            return _remote(args, out, workers)
        if args.ray is not None:
            return _ray(args, settings, out, policy, samples)
        return _local(args, settings, out, policy, samples, workers)


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: getattr(args, k) for k in ("model", "mode", "device") if getattr(args, k) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise UsageError("; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors())) from None


@dataclass(frozen=True)
class ViewDefaults:
    """What a request that names no policy or S gets, and the most S it may ask for: this machine's settings
    for a local or Ray run, the server's own (GET /v1/models) for --server."""

    policy: str
    samples: int
    max_samples: int

    @classmethod
    def of(cls, settings: Settings) -> ViewDefaults:
        return cls(settings.default_policy, settings.default_samples, settings.max_samples)

    @classmethod
    def of_server(cls, card: dict[str, Any], limits: Limits) -> ViewDefaults:
        """From the server's model card: its embeddings defaults, and its `max_samples`."""
        embeddings = card["defaults"]["embeddings"]
        return cls(str(embeddings["policy"]), int(embeddings["samples"]), limits.max_samples)


def _views(args: argparse.Namespace, defaults: ViewDefaults, *, input_size: int | None) -> tuple[str, int]:
    """(policy, S) of this run, within the limits the server applies (UsageError if not)."""
    from service.core.policies import check_samples

    policy = args.policy or defaults.policy
    try:
        check_seed(args.seed)
    except PolicyError as exc:
        raise UsageError(f"--seed: {exc}") from None
    try:
        samples = samples_for(policy, args.samples, defaults.samples)
        check_samples(policy, samples, max_samples=defaults.max_samples, input_size=input_size)
    except PolicyError as exc:
        raise UsageError(f"--samples: {exc}") from None
    if (args.variance or getattr(args, "dispersion", False)) and samples < 2:
        raise UsageError("--variance and --dispersion need at least 2 views (--samples 2 or more)")
    return policy, samples


def _inputs(args: argparse.Namespace, find: Callable[..., Inputs] = find_inputs) -> Inputs:
    """The run's inputs (`find`: sources.find_inputs here, or the same as a task on a Ray cluster)."""
    inputs = find([str(path) for path in args.images], getattr(args, "glob", None), args.list or ())
    if not inputs.files and not inputs.skipped:
        named = [*map(str, args.images), *(args.list or ())]
        raise UsageError("no image files found in " + " ".join(display_path(p) for p in named))
    return inputs


def _local(args: argparse.Namespace, settings: Settings, out: Path, policy: str, samples: int,
           workers: int) -> int:
    from service.bulk.local import DecodeLimits, run_local
    from service.core.embedding import EmbedOptions
    from service.core.policies import make_policy

    model = _load_model(settings)
    _views(args, ViewDefaults.of(settings), input_size=model.spec.preprocess.input_size)
    inputs = _inputs(args)
    options = EmbedOptions(samples, make_policy(policy), args.seed, return_variance=args.variance,
                           normalize=args.normalize, return_dispersion=args.dispersion)
    run = RunSettings(model.name, model.fingerprint, policy, samples, args.seed, args.normalize, args.variance,
                      args.dispersion)
    with _session(out, run, model.dim, inputs, args) as (dataset, errors, progress):
        run_local(inputs.files, dataset, errors, progress, model=model, options=options,
                  limits=DecodeLimits(settings.max_image_pixels, settings.max_image_side,
                                      settings.max_body_bytes),
                  workers=workers, max_batch_crops=settings.batching(model.device.type).max_batch_crops)
    return _exit_code(dataset, progress)


def _load_model(settings: Settings) -> LoadedModel:
    from models import ModelError, create_model

    try:
        return create_model(settings.model, settings.model_options())
    except ModelError as exc:
        raise UsageError(str(exc)) from None


def _remote(args: argparse.Namespace, out: Path, workers: int) -> int:
    import httpx

    from service.bulk.remote import RemoteFailed, run_remote
    from service.client import AsyncClient, MettaError

    api_key = None
    if args.api_key_file is not None:
        try:
            api_key = args.api_key_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"--api-key-file {args.api_key_file}: {exc.strerror or exc}") from None

    async def run() -> int:
        async with AsyncClient(args.server, api_key, concurrency=args.concurrency,
                               images_per_request=args.images_per_request,
                               connect_timeout=SERVER_CONNECT_TIMEOUT_S) as client:
            try:
                await client.ready()  # one try, no retries: a dead URL fails in seconds
                card = (await client.models())["data"][0]
            except httpx.HTTPError as exc:
                raise RemoteFailed(f"--server {args.server}: nothing answers there "
                                   f"({type(exc).__name__}: {exc or 'no reply'}); is metta-serve running?") from None
            except MettaError as exc:
                if exc.status in (401, 403):  # the fix is this command's flag, not the HTTP header the server names
                    fix = "the key given is not one it accepts" if api_key else "give its key with --api-key-file FILE"
                    raise UsageError(f"--server {args.server} asks for an API key ({exc.status}): {fix}") from None
                raise RemoteFailed(f"--server {args.server}: {exc}") from None
            if args.model is not None and args.model != card["name"]:
                raise UsageError(f"--model {args.model}: the server at {args.server} serves {card['name']}")
            policy, samples = _views(args, ViewDefaults.of_server(card, await client.limits()),
                                     input_size=(card.get("preprocess") or {}).get("input_size"))
            inputs = _inputs(args)
            run = RunSettings(card["name"], card["fingerprint"], policy, samples, args.seed, args.normalize,
                              args.variance, args.dispersion)
            with _session(out, run, int(card["dim"]), inputs, args,
                          retried=lambda: client.retried) as (dataset, errors, progress):
                await run_remote(inputs.files, dataset, errors, progress, client=client,
                                 concurrency=args.concurrency, readers=workers,
                                 images_per_request=args.images_per_request)
            return _exit_code(dataset, progress)

    try:
        return asyncio.run(run())
    except RemoteFailed as exc:
        print(f"metta embed: {exc}", file=sys.stderr)
        return FAILED


def _ray(args: argparse.Namespace, settings: Settings, out: Path, policy: str, samples: int) -> int:
    try:
        from service.bulk import raydata
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'metta-serve[ray]'") from None
    from models import ModelOptions
    from service.bulk.local import DecodeLimits

    try:
        raydata.connect(args.ray or None)
        placement = raydata.Placement.for_cluster(args.actors, args.actor_threads)
        device = args.device or ("cuda" if placement.gpus else "cpu")
        options = ModelOptions(device=device, dtype=settings.dtype, mode=settings.mode, weights=settings.weights,
                               random_weights=settings.random_weights,
                               threads=None if placement.gpus else placement.threads)
        spec = raydata.EmbedSpec(settings.model, options, policy, samples, args.seed, args.normalize, args.variance,
                                 args.dispersion, DecodeLimits(settings.max_image_pixels, settings.max_image_side,
                                                               settings.max_body_bytes),
                                 settings.batching(device.split(":")[0]).max_batch_crops)
        name, fingerprint, dim, input_size = raydata.describe_model(spec, placement)
        _views(args, ViewDefaults.of(settings), input_size=input_size)
        inputs = _inputs(args, raydata.list_on_cluster)
        run = RunSettings(name, fingerprint, policy, samples, args.seed, args.normalize, args.variance,
                          args.dispersion)
        with _session(out, run, dim, inputs, args) as (dataset, errors, progress):
            raydata.run_ray(inputs.files, dataset, errors, progress, spec=spec, placement=placement)
        return _exit_code(dataset, progress)
    except (raydata.Incomplete, raydata.Unreachable) as exc:
        print(f"metta embed: {exc}", file=sys.stderr)
        return FAILED
    finally:
        raydata.disconnect()


@contextmanager
def _session(out: Path, run: RunSettings, dim: int, inputs: Inputs, args: argparse.Namespace, *,
             retried: Callable[[], int] = lambda: 0) -> Iterator[tuple[Dataset, ErrorLog, Progress]]:
    """Open the dataset (its lock held by `dataset_command`); however the work ends (done, Ctrl-C, an error),
    keep the finished rows and print the summary, whose counts are the rows actually written."""
    dataset = Dataset(out, run, dim, part_rows=args.part_rows)
    dataset.open(overwrite=args.overwrite)
    errors = ErrorLog(errors_path(out))
    progress = Progress(len(inputs.files) + len(inputs.skipped))
    interrupted = False
    try:
        for path, kind, message in inputs.skipped:
            errors.add(path, kind, message)
            progress.add_bad()
        yield dataset, errors, progress
        dataset.finish()
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C: asyncio.run cancels a --server run's task
        interrupted = True
        raise
    finally:
        try:
            dataset.flush()  # every buffered row is complete: keep it (a no-op after finish)
        finally:
            errors.close()
            progress.close()
            print(progress.summary(str(out), str(errors.path), written=dataset.written,
                                   replaced=dataset.replaced, retried=retried(), interrupted=interrupted), flush=True)


def _exit_code(dataset: Dataset, progress: Progress) -> int:
    return FAILED if dataset.written == 0 and progress.already == 0 else OK


def _array_command(args: argparse.Namespace) -> int:
    """--out OUT.npy (or no --out): every image decoded in memory, one (N, dim) array; any bad file fails the run."""
    import numpy as np

    from service.core.decode import decode_image
    from service.core.embedding import embed
    from service.core.errors import ServiceError

    if not args.images:
        raise UsageError("name the image files to embed")
    settings = _settings(args)
    policy, samples = _views(args, ViewDefaults.of(settings), input_size=None)
    model = _load_model(settings)
    _views(args, ViewDefaults.of(settings), input_size=model.spec.preprocess.input_size)
    images = []
    for path in args.images:
        read = read_input(str(path), {}, settings.max_body_bytes)
        if read.data is None:
            print(f"metta embed: {read.error[1] if read.error else path}", file=sys.stderr)
            return FAILED
        try:
            images.append(decode_image(read.data, max_pixels=settings.max_image_pixels,
                                       max_side=settings.max_image_side, label=str(path)))
        except ServiceError as exc:
            print(f"metta embed: {exc}", file=sys.stderr)
            return FAILED
    started = time.perf_counter()
    result = embed(model, images, samples=samples, policy=policy, seed=args.seed, return_variance=args.variance,
                   normalize=args.normalize, max_batch_crops=settings.batching(model.device.type).max_batch_crops)
    elapsed = time.perf_counter() - started
    print(f"model {model.name} ({model.fingerprint}, {model.mode} on {model.device}); policy {policy}, "
          f"S={samples}, seed {args.seed}: {len(images)} images, {len(images) * samples} crops in {elapsed:.2f} s")
    for path, vector in zip(args.images, result.embeddings, strict=True):
        print(f"  {path}: dim {vector.shape[0]}, |mean| {np.linalg.norm(vector):.4f}")
    if args.out is not None:
        try:
            np.save(args.out, result.embeddings)
            print(f"means → {args.out}")
            if result.variances is not None:
                variance_path = args.out.with_name(args.out.stem + ".variance.npy")
                np.save(variance_path, result.variances)
                print(f"variances → {variance_path}")
        except OSError as exc:
            raise OutputError(f"could not write {args.out}: {exc.strerror or exc}") from None
    return OK
