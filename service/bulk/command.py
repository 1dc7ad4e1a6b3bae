"""`metta embed ... --out OUT.parquet`: options → model (or server) → dataset; the summary line and the exit code.

Exit codes: 0 the run completed (also when everything was already there, or bad files were skipped);
1 files were found but none could be embedded, or the server kept failing; 2 usage errors and
settings that do not match the existing dataset; 130 Ctrl-C (finished parts kept).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from service.bulk.dataset import PART_ROWS, Dataset, ErrorLog, RunSettings, errors_path
from service.bulk.files import UsageError, find_images
from service.bulk.progress import Progress
from service.core.options import PolicyError, check_seed, samples_for
from service.settings import Settings

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130


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


_DATASET_ONLY = ("glob", "workers", "server", "api_key_file", "images_per_request", "dispersion", "overwrite")


def writes_dataset(args: argparse.Namespace) -> bool:
    """A Parquet dataset unless --out is missing or ends in .npy (today's in-memory path, for small jobs).

    A dataset-only flag also means this path, where bulk_command asks for a dataset --out."""
    wants_dataset = any(getattr(args, name) not in (None, False) for name in _DATASET_ONLY)
    return wants_dataset or (args.out is not None and args.out.suffix.lower() != ".npy")


def bulk_command(args: argparse.Namespace) -> int:
    """Run `metta embed` into a Parquet dataset; returns the exit code."""
    try:
        if args.out is None or args.out.suffix.lower() == ".npy":
            flags = [f"--{name.replace('_', '-')}" for name in _DATASET_ONLY
                     if getattr(args, name) not in (None, False)]
            raise UsageError(f"{', '.join(flags)} need a dataset: --out OUT.parquet")
        files = find_images([str(path) for path in args.images], args.glob)
        if not files:
            raise UsageError("no image files found in " + " ".join(str(p) for p in args.images))
        settings = _settings(args)
        policy = args.policy or settings.default_policy
        samples = samples_for(policy, args.samples, settings.default_samples)
        check_seed(args.seed)
        if (args.variance or args.dispersion) and samples < 2:
            raise UsageError("--variance and --dispersion need at least 2 views (--samples 2 or more)")
        workers = args.workers or settings.decode_workers
        if workers < 1 or args.concurrency < 1 or (args.images_per_request or 1) < 1:
            raise UsageError("--workers, --concurrency and --images-per-request must be at least 1")
        if not 1 <= args.part_rows <= PART_ROWS:
            raise UsageError(f"--part-rows must be in [1, {PART_ROWS}]")
        out = Path(args.out)
        if args.server is not None:
            return _remote(args, files, out, policy, samples, workers)
        return _local(args, settings, files, out, policy, samples, workers)
    except (UsageError, PolicyError) as exc:
        print(f"metta embed: {exc}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return INTERRUPTED


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: getattr(args, k) for k in ("model", "mode", "device") if getattr(args, k) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise UsageError("; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors())) from None


def _local(args: argparse.Namespace, settings: Settings, files: list[str], out: Path, policy: str, samples: int,
           workers: int) -> int:
    from models import ModelError, create_model
    from service.bulk.local import DecodeLimits, run_local
    from service.core.embedding import EmbedOptions
    from service.core.policies import make_policy

    options = EmbedOptions(samples, make_policy(policy), args.seed, return_variance=args.variance,
                           normalize=args.normalize, return_dispersion=args.dispersion)
    try:
        model = create_model(settings.model, settings.model_options())
    except ModelError as exc:
        raise UsageError(str(exc)) from None
    run = RunSettings(model.name, model.fingerprint, policy, samples, args.seed, args.normalize, args.variance,
                      args.dispersion)
    with _session(out, run, model.dim, len(files), args) as (dataset, errors, progress):
        run_local(files, dataset, errors, progress, model=model, options=options,
                  limits=DecodeLimits(settings.max_image_pixels, settings.max_image_side), workers=workers,
                  max_batch_crops=settings.batching(model.device.type).max_batch_crops)
    return _exit_code(progress)


def _remote(args: argparse.Namespace, files: list[str], out: Path, policy: str, samples: int, workers: int) -> int:
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
                               images_per_request=args.images_per_request) as client:
            try:
                card = (await client.models())["data"][0]
            except (MettaError, httpx.HTTPError) as exc:
                raise UsageError(f"--server {args.server}: {exc}") from None
            if args.model is not None and args.model != card["name"]:
                raise UsageError(f"--model {args.model}: the server at {args.server} serves {card['name']}")
            run = RunSettings(card["name"], card["fingerprint"], policy, samples, args.seed, args.normalize,
                              args.variance, args.dispersion)
            with _session(out, run, int(card["dim"]), len(files), args) as (dataset, errors, progress):
                await run_remote(files, dataset, errors, progress, client=client, concurrency=args.concurrency,
                                 readers=workers,
                                 images_per_request=args.images_per_request)
            return _exit_code(progress)

    try:
        return asyncio.run(run())
    except RemoteFailed as exc:
        print(f"metta embed: {exc}", file=sys.stderr)
        return FAILED


@contextmanager
def _session(out: Path, run: RunSettings, dim: int, total: int,
             args: argparse.Namespace) -> Iterator[tuple[Dataset, ErrorLog, Progress]]:
    """Open the dataset; however the work ends (done, Ctrl-C, an error), keep the finished rows, print the summary."""
    dataset = Dataset(out, run, dim, part_rows=args.part_rows)
    dataset.open(overwrite=args.overwrite)
    errors = ErrorLog(errors_path(out))
    progress = Progress(total)
    try:
        yield dataset, errors, progress
    finally:
        dataset.flush()  # every buffered row is complete: keep it
        errors.close()
        progress.close()
        print(progress.summary(str(out), str(errors.path)), flush=True)


def _exit_code(progress: Progress) -> int:
    return FAILED if progress.embedded == 0 and progress.already == 0 else OK
