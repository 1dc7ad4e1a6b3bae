"""Command lines: `metta-serve` (the HTTP service) and `metta embed` (the library on local files)."""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from pathlib import Path

from pydantic import ValidationError

from service.core.options import POLICY_NAMES
from service.settings import Settings

_NOT_FLAGS = {"api_keys"}  # secrets come from the environment or a file, never the command line


def _settings_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """One flag per settings field: --max-batch-crops maps onto Settings.max_batch_crops, and so on."""
    # allow_abbrev=False: otherwise `--api-keys SECRET` would be read as `--api-keys-file SECRET`
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     epilog="Every flag can also be set as METTA_<NAME> in the environment.")
    for name, field in Settings.model_fields.items():
        if name in _NOT_FLAGS:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if _is_bool(field.annotation):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)
    return parser


def _is_bool(annotation: object) -> bool:
    if annotation is bool:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return bool in typing.get_args(annotation)
    return False


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [f"  --{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors()]
        sys.exit("invalid settings:\n" + "\n".join(lines))


def serve_main(argv: list[str] | None = None) -> None:
    parser = _settings_parser("metta-serve", "Serve MeTTA mean embeddings over HTTP.")
    settings = settings_from_args(parser.parse_args(argv))
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from service.api.app import create_app
    from service.api.server import serve

    serve(create_app(settings), settings)  # one uvicorn worker; SIGTERM: lame duck, drain, exit 0


# Each subcommand's one-line help: `metta --help` lists them without loading any (torch, evaluation/).
_COMMANDS = {
    "embed": "embed image files and folders (--out OUT.parquet: a dataset)",
    "eval": "measure MeTTA's quality on labelled photos (docs/quality.md)",
}


def main(argv: list[str] | None = None) -> None:
    """`metta embed` and `metta eval`. Only the chosen subcommand's arguments are built, so its imports
    alone are paid: `metta --help` and `metta embed --server URL` never import torch, and `evaluation/` is
    loaded by `metta eval` only."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="metta", description="MeTTA mean embeddings without a server.")
    commands = parser.add_subparsers(dest="command", required=True)
    parsers = {name: commands.add_parser(name, help=help_text) for name, help_text in _COMMANDS.items()}
    chosen = argv[0] if argv and argv[0] in _COMMANDS else None
    if chosen == "embed":
        _add_embed_arguments(parsers["embed"])
    elif chosen == "eval":
        from evaluation.cli import add_eval_arguments

        add_eval_arguments(parsers["eval"])
    args = parser.parse_args(argv)
    if args.command == "embed":
        from service.bulk.command import embed_command

        sys.exit(embed_command(args))  # exit codes: service/bulk/command.py
    elif args.command == "eval":
        from evaluation.cli import eval_command

        eval_command(args)


def _add_embed_arguments(embed_cmd: argparse.ArgumentParser) -> None:
    embed_cmd.add_argument("images", nargs="*", metavar="PATH_OR_URI",
                           help="files, folders, globs, or URIs such as s3://bucket/prefix")
    embed_cmd.add_argument("--samples", type=int, default=None, help="views per image (default: the setting)")
    embed_cmd.add_argument("--policy", default=None, choices=POLICY_NAMES)
    embed_cmd.add_argument("--seed", type=int, default=0)
    embed_cmd.add_argument("--variance", action="store_true", help="also write the per-dimension variance")
    embed_cmd.add_argument("--normalize", action="store_true", help="L2-normalise each mean")
    embed_cmd.add_argument("--out", type=Path, default=None,
                           help="OUT.npy: the means as one (N, dim) array (small jobs); "
                                "OUT.parquet: a resumable Parquet dataset, streamed (any number of files)")
    embed_cmd.add_argument("--model", default=None)
    embed_cmd.add_argument("--mode", default=None, help="execution engine: auto|eager|torchscript|openvino")
    embed_cmd.add_argument("--device", default=None)
    from service.bulk.command import add_bulk_arguments

    add_bulk_arguments(embed_cmd)
