"""The inputs of a bulk run: files as given, folders walked recursively, image extensions only.

Each input is known by its canonical identity: the resolved absolute path (`os.path.realpath`: `./x`, `x`,
`/abs/x` and a symlink to it are one file) and, once read, the SHA-256 of its bytes. Only regular files
are read (a FIFO would block the run, a device never end), each read is bounded, and names are kept as
the operating system gives them (bytes that are not UTF-8 survive as Python's surrogate escapes; the
dataset stores them losslessly, see `path_bytes`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Extensions of the formats decode.py opens, compared in lower case (ImageNet's .JPEG included).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                              ".heic", ".heif", ".hif", ".avif"})
NOT_A_FILE = "not_a_regular_file"  # the error type of a FIFO, socket, device or folder given as an image
UNREADABLE = "unreadable"
TOO_LARGE = "payload_too_large"  # as the server's 413


class UsageError(Exception):
    """A problem with the command line or the output: exit code 2."""


def canonical_path(path: str) -> str:
    """The identity of a local file: its resolved absolute path (symlinks followed, `.`/`..` gone)."""
    return os.path.realpath(path)


def path_bytes(path: str) -> bytes:
    """The name exactly as the file system holds it (undecodable bytes included)."""
    return os.fsencode(path)


def display_path(path: str) -> str:
    """The name as valid UTF-8 text: bytes that are not UTF-8 written as `\\xNN` (for logs and the `path` column)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass
class Inputs:
    """What a run will read: canonical paths, each once, in a stable order; and the entries it will not."""

    files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (path, type, message)


def find_images(arguments: Sequence[str], pattern: str | None = None) -> Inputs:
    """Every input file by its canonical path, in a stable order, each once however it was reached.

    A file argument is taken whatever its extension (the user named it). A folder is walked recursively;
    its image files (by extension, any case) count, and `pattern` (fnmatch), when given, must match the
    file's path below the folder or its name. Entries that are not regular files (FIFOs, sockets, devices,
    dangling links) are listed in `skipped`, never opened.
    """
    inputs = Inputs()
    seen: set[str] = set()
    for argument in arguments:
        if os.path.isdir(argument):
            paths = _walk(argument, pattern)
        elif os.path.lexists(argument):
            paths = [argument]
        else:
            raise UsageError(f"{display_path(argument)}: no such file or folder")
        for path in paths:
            identity = canonical_path(path)
            if identity in seen:
                continue
            seen.add(identity)
            problem = _not_regular(identity)
            if problem is None:
                inputs.files.append(identity)
            else:  # reported under the name found (a link's target may say nothing: /dev/zero)
                found = os.path.abspath(path)
                target = "" if found == identity else f" (a link to {display_path(identity)})"
                inputs.skipped.append((found, problem[0], f"{display_path(found)}{target}{problem[1]}"))
    return inputs


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


def _not_regular(path: str) -> tuple[str, str] | None:
    """(type, the end of a message) when `path` is not a regular file that can be stat'ed, else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return UNREADABLE, f" could not be read: {exc.strerror or exc}"
    if not stat.S_ISREG(mode):
        return NOT_A_FILE, f" is a {_kind(mode)}, not a regular file: skipped"
    return None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"


@dataclass
class InputFile:
    """One input after reading: its bytes, or why there are none (unreadable, or already in the dataset)."""

    path: str
    sha256: str = ""
    data: bytes | None = None
    error: tuple[str, str] | None = None  # (type, message) of a bad file


def read_input(path: str, known: Mapping[str, str], max_bytes: int) -> InputFile:
    """Read (at most `max_bytes`) and hash a regular file; the bytes are dropped when `known[path]` is its hash.

    The file is opened without blocking and checked again after opening: a name swapped for a FIFO or a
    device since the listing is refused, not read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return InputFile(path, error=(UNREADABLE, f"{display_path(path)} could not be read: {exc.strerror or exc}"))
    with os.fdopen(fd, "rb") as file:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return InputFile(path, error=(NOT_A_FILE, f"{display_path(path)} is a {_kind(info.st_mode)}, "
                                                          "not a regular file: skipped"))
            data = file.read(max_bytes + 1) if info.st_size <= max_bytes else b""
        except OSError as exc:
            return InputFile(path, error=(UNREADABLE,
                                          f"{display_path(path)} could not be read: {exc.strerror or exc}"))
    if info.st_size > max_bytes or len(data) > max_bytes:
        return InputFile(path, error=(TOO_LARGE, f"{display_path(path)}: larger than the {max_bytes}-byte body "
                                                 "limit (--max-body-bytes)"))
    return hashed_input(path, data, known)


def hashed_input(path: str, data: bytes, known: Mapping[str, str]) -> InputFile:
    """The input with its sha256; its bytes only when the dataset does not hold this content for `path`."""
    sha256 = hashlib.sha256(data).hexdigest()
    if known.get(path) == sha256:
        return InputFile(path, sha256)
    return InputFile(path, sha256, data)
