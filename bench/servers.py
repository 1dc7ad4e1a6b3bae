"""Start the servers under test as process groups on free loopback ports; stop them by their PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read()
    except OSError:
        return 0, b""


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    log_file: IO[bytes]
    ready_path: str
    started_s: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def metrics_text(self) -> str:
        status, body = _get(self.url + "/metrics", timeout=10)
        return body.decode() if status == 200 else ""

    def cpu_seconds(self) -> float:
        """utime + stime of every live process in this server's process group."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == self.pid:  # pgrp
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def rss_bytes(self) -> int:
        """Resident memory of the server's main process."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def pause(self) -> None:
        """SIGSTOP the whole group: an idle server under test's neighbours then use no CPU at all."""
        os.killpg(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the group (its own session), then SIGKILL to the group if it overstays."""
        if self.process.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGCONT)  # in case it was paused
                os.killpg(self.pid, signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(10)
            except ProcessLookupError:
                pass
        # children of the group (LitServe's workers) that outlived the leader
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.log_file.close()


def launch(name: str, args: list[str], ready_path: str, log_dir: Path, env: dict[str, str] | None = None) -> Server:
    """`python ARGS --host 127.0.0.1 --port P` in its own session (so its workers can be stopped with it)."""
    port = free_port()
    log_path = log_dir / f"{name}-{port}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen([sys.executable, *args, "--host", "127.0.0.1", "--port", str(port)], cwd=REPO,
                               stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    server = Server(name, process, port, log_path, log_file, ready_path)
    server.extra["launched_at"] = time.perf_counter()
    return server


def wait_ready(server: Server, timeout: float = 300.0) -> Server:
    """Returns once GET ready_path says 200; stops the server and raises if it dies or overstays."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            code = server.process.returncode
            server.stop()
            raise RuntimeError(f"{server.name} exited with {code} before ready; see {server.log_path}")
        if _get(server.url + server.ready_path)[0] == 200:
            server.started_s = time.perf_counter() - float(server.extra["launched_at"])  # type: ignore[arg-type]
            return server
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"{server.name} not ready within {timeout} s; see {server.log_path}")


def start(name: str, args: list[str], ready_path: str, log_dir: Path, ready_timeout: float = 300.0,
          env: dict[str, str] | None = None) -> Server:
    return wait_ready(launch(name, args, ready_path, log_dir, env), ready_timeout)
