"""The inputs of a bulk run: files as given, folders walked recursively, image extensions only."""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Extensions of the formats decode.py opens, compared in lower case (ImageNet's .JPEG included).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


class UsageError(Exception):
    """A problem with the command line or the output: exit code 2."""


def find_images(arguments: Sequence[str], pattern: str | None = None) -> list[str]:
    """Every input path, in a stable order, each once.

    A file argument is taken as given (the user named it). A folder is walked recursively; its image
    files (by extension, any case) are joined onto the argument as written, and `pattern` (fnmatch),
    when given, must match the file's path below the folder or its name.
    """
    found: list[str] = []
    seen: set[str] = set()
    for argument in arguments:
        if os.path.isdir(argument):
            paths = _walk(argument, pattern)
        elif os.path.exists(argument):
            paths = [argument]
        else:
            raise UsageError(f"{argument}: no such file or folder")
        for path in paths:
            if path not in seen:
                seen.add(path)
                found.append(path)
    return found


def _walk(folder: str, pattern: str | None) -> list[str]:
    paths = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()  # os.walk visits folders in this list's order: sorted means the same order on every run
        for name in sorted(names):
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(root, name)
            below = os.path.relpath(path, folder)
            if pattern is None or fnmatch.fnmatch(below, pattern) or fnmatch.fnmatch(name, pattern):
                paths.append(path)
    return paths


@dataclass
class InputFile:
    """One input after reading: its bytes, or why there are none (unreadable, or already in the dataset)."""

    path: str
    sha256: str = ""
    data: bytes | None = None
    error: tuple[str, str] | None = None  # (type, message) of a bad file


def read_input(path: str, done: frozenset[tuple[str, str]]) -> InputFile:
    """Read and hash the file; the bytes are dropped when the dataset already holds (path, sha256)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return InputFile(path, error=("unreadable", f"{path} could not be read: {exc.strerror or exc}"))
    sha256 = hashlib.sha256(data).hexdigest()
    if (path, sha256) in done:
        return InputFile(path, sha256)
    return InputFile(path, sha256, data)
