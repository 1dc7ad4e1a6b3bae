"""Decodes that can be stopped: a child process per decode thread, killed when its decode runs past the
time budget or its caller gives up.

A thread cannot be interrupted inside Pillow's C code, so a decode that turns out slow used to hold its
worker (and the request's deadline did not stop it). Here the pixels are made in a child process
(`python -m service.core.isolation`, which imports Pillow and numpy, not torch) that the calling thread
waits on with a deadline; past `budget_s`, or when the caller's cancel event is set (client gone, deadline
passed), the child is killed (SIGKILL: no CPU is spent after) and the next decode starts a fresh one. A
child that crashes (a segfault in a codec) only fails its own image.

What it costs per image is one copy of the encoded bytes and one of the decoded pixels through a pipe
(measured in docs/benchmarks.md). `IsolatedDecoder.applies` says which images take this path: every
format whose decode time is not bounded tightly by its pixel count (all but baseline JPEG); a baseline JPEG
decodes in the calling thread (libjpeg-turbo's time is linear in its pixels, ≤ 40 M of them).

Protocol on the child's stdin/stdout: a request is a 4-byte big-endian length, a JSON header, and the
encoded bytes (their length in the header); a reply is a 4-byte length, a JSON header (`shape`, or
`refusal` and `message`), and the pixels (H × W × 3 bytes) when there is a shape.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from service.core.errors import InvalidImage, PayloadTooLarge

_LENGTH = struct.Struct(">I")
_ERRORS: dict[str, type[InvalidImage] | type[PayloadTooLarge]] = {
    "InvalidImage": InvalidImage, "PayloadTooLarge": PayloadTooLarge}
_READY = b"R"  # a child's first byte: its imports are done
_POLL_S = 0.05  # how often a waiting thread looks at its cancel event
_local = threading.local()


@contextlib.contextmanager
def cancel_scope(event: threading.Event) -> Iterator[None]:
    """Isolated decodes run by this thread inside the block are killed as soon as `event` is set."""
    previous = getattr(_local, "cancel", None)
    _local.cancel = event
    try:
        yield
    finally:
        _local.cancel = previous


class DecodeStopped(InvalidImage):
    """A decode killed at its time budget (400: the file costs more than the service gives one image)."""


class IsolatedDecoder:
    """One child process per calling thread; `close` kills them all. The time budget counts from the
    request's bytes being sent to a child that has finished starting.

    `spares` children are started at once (a child takes ≈ 0.3 s to import Pillow and numpy) and handed to
    threads on their first decode; each child killed is replaced by a new spare, so a decode never waits
    for a child to start unless more threads than spares decode at once."""

    def __init__(self, budget_s: float, *, spares: int = 0) -> None:
        self.budget_s = budget_s
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # thread id → its child
        self._lock = threading.Lock()
        self._spares = [_spawn() for _ in range(spares)]
        self._started: set[int] = set()  # pids of children whose ready byte was read
        self.stopped = 0  # decodes killed at the budget
        self.crashed = 0  # children that died on their own

    @staticmethod
    def applies(image_format: str | None, progressive: bool) -> bool:
        """Whether an image takes the isolated path: all but baseline JPEGs (see the module docstring)."""
        return image_format != "JPEG" or progressive

    def decode(self, data: bytes, *, reduction: int, icc_to_srgb: bool, max_pixels: int, max_side: int,
               label: str) -> np.ndarray:
        """The (H, W, 3) uint8 pixels of `OpenedImage.pixels`, made in this thread's child process."""
        child = self._child()
        header = json.dumps({"size": len(data), "reduction": reduction, "icc_to_srgb": icc_to_srgb,
                             "max_pixels": max_pixels, "max_side": max_side, "label": label}).encode()
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdin.write(_LENGTH.pack(len(header)) + header)
            child.stdin.write(data)
            child.stdin.flush()
            self._wait(child, label)
            reply = json.loads(_read_exactly(child.stdout, _LENGTH.unpack(_read_exactly(child.stdout, 4))[0]))
            if "refusal" in reply:
                raise _ERRORS.get(reply["refusal"], InvalidImage)(reply["message"])
            height, width, bands = reply["shape"]
            pixels = bytearray(height * width * bands)
            _read_into(child.stdout, pixels)
        except (BrokenPipeError, EOFError, OSError, ValueError, KeyError) as exc:
            self._kill(child)
            self.crashed += 1
            raise InvalidImage(f"{label} could not be decoded (the decoder stopped)") from exc
        return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, bands)

    def _wait(self, child: subprocess.Popen[bytes], label: str) -> None:
        """Until the child's reply starts; kills it past the budget or once the caller's event is set."""
        assert child.stdout is not None
        deadline = time.monotonic() + self.budget_s
        cancel: threading.Event | None = getattr(_local, "cancel", None)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (cancel is not None and cancel.is_set()):
                self._kill(child)
                if left <= 0:
                    self.stopped += 1
                    raise DecodeStopped(f"{label} took longer than the decode time budget ({self.budget_s:g} s); "
                                        "its decode was stopped")
                raise InvalidImage(f"{label}: decode abandoned (the request was cancelled)")
            ready, _, _ = select.select([child.stdout], [], [], min(left, _POLL_S))
            if ready:
                return

    def _child(self) -> subprocess.Popen[bytes]:
        key = threading.get_ident()
        with self._lock:
            child = self._children.get(key)
        if child is not None and child.poll() is None:
            return child
        with self._lock:
            child = self._spares.pop() if self._spares else None
        if child is None or child.poll() is not None:
            child = _spawn()
        self._wait_started(child)
        with self._lock:
            self._children[key] = child
        return child

    def _wait_started(self, child: subprocess.Popen[bytes]) -> None:
        """Until the child's imports are done (its ready byte): the budget counts decoding only."""
        if child.pid in self._started:
            return
        assert child.stdout is not None
        if child.stdout.read(1) != _READY:
            _stop(child)
            raise InvalidImage("the isolated decoder did not start")
        self._started.add(child.pid)

    def warm(self) -> None:
        """Until every spare child has started (the service calls it before it says ready)."""
        with self._lock:
            spares = list(self._spares)
        for child in spares:
            with contextlib.suppress(InvalidImage):
                self._wait_started(child)

    def _kill(self, child: subprocess.Popen[bytes]) -> None:
        _stop(child)
        with self._lock:
            for key, known in list(self._children.items()):
                if known is child:
                    del self._children[key]
                    self._spares.append(_spawn())  # its thread's next decode finds a child ready

    def pids(self) -> list[int]:
        with self._lock:
            return [child.pid for child in self._children.values()]

    def close(self) -> None:
        with self._lock:
            children, spares = list(self._children.values()), self._spares
            self._children, self._spares = {}, []
        for child in children + spares:
            _stop(child)


def _spawn() -> subprocess.Popen[bytes]:
    # glibc's mmap threshold fixed, as in the image: a child's freed decode goes back to the system
    env = {"MALLOC_MMAP_THRESHOLD_": "1048576", **os.environ}
    return subprocess.Popen([sys.executable, "-m", "service.core.isolation"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, start_new_session=True, env=env)


def _stop(child: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(signal.SIGKILL)
    child.wait()
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise EOFError("the decoder's reply was cut short")
    return data


def _read_into(stream: Any, buffer: bytearray) -> None:
    view, got = memoryview(buffer), 0
    while got < len(buffer):
        count = stream.readinto(view[got:])
        if not count:
            raise EOFError("the decoder's reply was cut short")
        got += count


def _serve() -> None:
    """The child: decode requests from stdin until it closes."""
    from service.core.decode import open_image

    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    replies.write(_READY)
    replies.flush()
    while True:
        length = requests.read(4)
        if len(length) < 4:
            return
        header = json.loads(requests.read(_LENGTH.unpack(length)[0]))
        data = requests.read(header["size"])
        reply: dict[str, object]
        pixels: np.ndarray | None = None
        opened = None
        try:
            opened = open_image(data, max_pixels=header["max_pixels"], max_side=header["max_side"],
                                label=header["label"])
            pixels = opened.pixels(header["reduction"], icc_to_srgb=header["icc_to_srgb"])
            reply = {"shape": list(pixels.shape)}
        except (InvalidImage, PayloadTooLarge) as exc:
            reply = {"refusal": type(exc).__name__, "message": str(exc)}
        except MemoryError:
            reply = {"refusal": "PayloadTooLarge", "message": f"{header['label']} is too large to decode"}
        del data, opened  # the encoded bytes and the opened image: not held while the reply is written
        encoded = json.dumps(reply).encode()
        replies.write(_LENGTH.pack(len(encoded)) + encoded)
        if pixels is not None:
            replies.write(np.ascontiguousarray(pixels).data.cast("B"))  # no bytes copy of the pixels
        replies.flush()
        # Nothing of this image is kept while the child waits for the next one (an idle child held two
        # copies of its last image's pixels, 240 MB after a 40 MP one).
        del pixels


if __name__ == "__main__":
    _serve()
