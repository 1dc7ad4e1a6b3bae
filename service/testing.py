"""What the tests and the benchmarks share: a real server process, a free port, the sample photos, RSS.

Shipped with the package (like `starlette.testclient`) so `tests/` and `bench/` import it without path
tricks. Only the standard library at import time; numpy and Pillow only to draw synthetic photos.

- `start_server(log_dir, *flags)`: `python -m service FLAGS` on a free loopback port, returned once
  /readyz says 200; `start_process` does the same for any `python -m MODULE` that takes --host/--port.
  Stopped by its PID (`terminate`: SIGTERM, then wait), its output in a log file.
- `photos(limit)`: the sample photos ($METTA_SAMPLES_DIR, else ../shared/data/imagenet-sample), else
  synthetic JPEGs of the same sizes, and says which (`Photos.source`). Speed figures may use either;
  quality figures need the photos.
- `rss_bytes(pid)`, `tree_memory(pid)`: resident memory of a process, of a process and its descendants.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, NamedTuple

REPO = Path(__file__).resolve().parents[1]
SAMPLES_ENV = "METTA_SAMPLES_DIR"  # where the sample photos are, for tests, bench/ and `metta eval`
DEFAULT_SAMPLE_DIR = REPO.parent / "shared" / "data" / "imagenet-sample"  # beside the checkout


def sample_dir() -> Path:
    """The sample photos' folder: $METTA_SAMPLES_DIR when set, else ../shared/data/imagenet-sample."""
    given = os.environ.get(SAMPLES_ENV)
    return Path(given).expanduser() if given else DEFAULT_SAMPLE_DIR


SAMPLE_DIR = sample_dir()
# The sample photos' commonest sizes (width, height), in about their proportions: what synthetic photos use.
SYNTHETIC_SIZES = ((500, 375), (500, 333), (375, 500), (500, 375), (333, 500), (500, 334), (500, 375), (640, 480))

# Loopback only: never through a proxy named in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body); (0, b"") when nothing answered."""
    try:
        with _OPENER.open(url, timeout=timeout) as reply:
            return int(reply.status), reply.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()
    except OSError:
        return 0, b""


# ---------------------------------------------------------------------------------------------- servers

@dataclass
class ServerProcess:
    """A server started by `start_process`: its process, URL and log. Stop it with `terminate` or `stop`."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    log_file: IO[bytes]
    own_session: bool = False  # started as its own process group: signals go to the whole group
    started_s: float = 0.0  # from launch to ready
    _launched_at: float = field(default_factory=time.perf_counter, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics_text(self) -> str:
        status, body = http_get(self.url + "/metrics", timeout=10)
        return body.decode() if status == 200 else ""

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def wait_ready(self, path: str = "/readyz", timeout: float = 180.0) -> ServerProcess:
        """Returns once GET `path` says 200; stops the server and raises if it exits first or overstays."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise RuntimeError(f"{self.name} exited with {code} before ready\n{self._log_tail()}")
            if http_get(self.url + path)[0] == 200:
                self.started_s = time.perf_counter() - self._launched_at
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} not ready within {timeout} s\n{self._log_tail()}")

    def signal(self, signum: int) -> None:
        """To the process, or to its whole group when it runs in its own session."""
        with contextlib.suppress(ProcessLookupError):
            if self.own_session:
                os.killpg(self.pid, signum)
            else:
                self.process.send_signal(signum)

    def pause(self) -> None:
        """SIGSTOP (the group, with own_session): a paused server uses no CPU while a neighbour is measured."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def cpu_seconds(self) -> float:
        """utime + stime of every live process in this server's process group (own_session) or of the process."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in _pids():
            fields = _stat_fields(pid)
            if fields and (int(fields[2]) == self.pid if self.own_session else pid == self.pid):
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit code. One that overstays is killed and TimeoutError raised."""
        try:
            if self.process.poll() is None:
                self.signal(signal.SIGCONT)  # in case it was paused
                self.signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait(10)
                raise TimeoutError(f"{self.name} did not exit within {timeout} s of SIGTERM\n{self._log_tail()}") \
                    from None
        finally:
            if self.own_session:  # workers of the group (LitServe's) that outlived the leader
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
            self.log_file.close()

    def stop(self, timeout: float = 30.0) -> int | None:
        """`terminate` for clean-up paths: never raises; None when it had to be killed."""
        try:
            return self.terminate(timeout)
        except TimeoutError:
            return None

    def _log_tail(self, chars: int = 20_000) -> str:
        return self.log()[-chars:]


def start_process(module_args: Sequence[str], log_dir: Path, *, name: str = "server", ready_path: str = "/readyz",
                  ready_timeout: float = 180.0, env: dict[str, str] | None = None,
                  own_session: bool = False) -> ServerProcess:
    """`python MODULE_ARGS --host 127.0.0.1 --port P` from the repository root, output to
    LOG_DIR/NAME-P.log; returned once GET ready_path says 200. `own_session` starts it as its own process
    group, so workers it forks are paused and stopped with it."""
    port = free_port()
    log_path = log_dir / f"{name}-{port}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen([sys.executable, *module_args, "--host", "127.0.0.1", "--port", str(port)],
                               cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=own_session,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    server = ServerProcess(name, process, port, log_path, log_file, own_session)
    return server.wait_ready(ready_path, ready_timeout)


def start_server(log_dir: Path, *flags: str, ready_timeout: float = 180.0, env: dict[str, str] | None = None,
                 name: str = "metta-serve", own_session: bool = False) -> ServerProcess:
    """`python -m service FLAGS` on a free loopback port; returned once /readyz says 200."""
    return start_process(["-m", "service", *flags], log_dir, name=name, ready_timeout=ready_timeout, env=env,
                         own_session=own_session)


# ---------------------------------------------------------------------------------------------- photos

@dataclass(frozen=True)
class Photos:
    """Encoded images and where they came from: "sample" photos, "synthetic" JPEGs, or "absent" (none)."""

    images: list[bytes]
    source: Literal["sample", "synthetic", "absent"]

    def __len__(self) -> int:
        return len(self.images)


def sample_paths(directory: Path = SAMPLE_DIR) -> list[Path]:
    """The sample JPEGs, sorted by name; [] when the folder is absent."""
    return sorted(directory.glob("*.JPEG")) if directory.is_dir() else []


def sample_labels(directory: Path = SAMPLE_DIR) -> list[tuple[Path, int]]:
    """(photo path, ImageNet class index) from the folder's labels.tsv, in file order; [] without one."""
    labels = directory / "labels.tsv"
    if not labels.is_file():
        return []
    rows = []
    for line in labels.read_text().splitlines()[1:]:
        name, class_index = line.split("\t")[:2]
        rows.append((directory / name, int(class_index)))
    return rows


def photos(limit: int = 200, *, allow_synthetic: bool = True, directory: Path = SAMPLE_DIR) -> Photos:
    """At most `limit` sample photos; without them, `limit` synthetic JPEGs (allow_synthetic) or none."""
    paths = sample_paths(directory)[:limit]
    if paths:
        return Photos([path.read_bytes() for path in paths], "sample")
    if allow_synthetic:
        return Photos(synthetic_photos(limit), "synthetic")
    return Photos([], "absent")


def synthetic_photos(count: int) -> list[bytes]:
    """`count` deterministic smooth random pictures at the sample photos' sizes, JPEG quality 90.

    Four octaves of bilinearly upsampled noise: about as costly to decode and render as the photos
    (same pixels, two thirds of their bytes), so speed figures hold; their content means nothing.
    """
    import numpy as np
    from PIL import Image

    out = []
    for index in range(count):
        width, height = SYNTHETIC_SIZES[index % len(SYNTHETIC_SIZES)]
        rng = np.random.default_rng(index)
        pixels = np.full((height, width, 3), 128.0, np.float32)
        for cells, amplitude in ((3, 60.0), (12, 30.0), (48, 20.0), (250, 22.0)):
            grid = rng.standard_normal((max(2, cells * height // width), cells, 3), dtype=np.float32)
            layer = Image.fromarray(np.clip(grid * 40 + 128, 0, 255).astype(np.uint8))
            upsampled = np.asarray(layer.resize((width, height), Image.Resampling.BILINEAR), np.float32)
            pixels += (upsampled - 128) * (amplitude / 40)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


# ---------------------------------------------------------------------------------------------- memory

class TreeMemory(NamedTuple):
    """Bytes: RSS and PSS summed over a process and its descendants, and the RSS of the process alone.

    PSS shares each page among the processes mapping it: a fork (OpenVINO's telemetry forks the process to
    post its message) then counts once, where summed RSS counts its copy-on-write pages twice.
    """

    rss: int
    pss: int
    own_rss: int


def rss_bytes(pid: int) -> int:
    """VmRSS of one process (/proc/PID/status); 0 once it is gone."""
    return _kib_field(Path(f"/proc/{pid}/status"), "VmRSS:")


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for child in _pids():
        fields = _stat_fields(child)
        if fields:
            children.setdefault(int(fields[1]), []).append(child)
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def tree_memory(pid: int) -> TreeMemory:
    rss = pss = 0
    for member in descendants(pid):
        rss += rss_bytes(member)
        pss += _kib_field(Path(f"/proc/{member}/smaps_rollup"), "Pss:")
    return TreeMemory(rss, pss, rss_bytes(pid))


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, ...]; [] once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rindex(")") + 2:].split()


def _kib_field(path: Path, name: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
