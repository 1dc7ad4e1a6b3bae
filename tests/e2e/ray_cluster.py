"""A real Ray cluster on loopback for the tests: `ray start --head` (dashboard off) and worker nodes.

Each node is a `ray start --block` process in its own process group (its raylet, object store and workers
are its descendants), so the test stops exactly the processes it started, by process group, and can kill
one node's raylet with SIGKILL as a lost machine would. The nodes run with this repository on PYTHONPATH
(a Ray worker imports `service` as the driver does) and a small object store; the cluster's token
(Ray's token authentication) is made by the test and given to its drivers (`client_env`). Missing Ray skips, and fails
under CI=true (requirements-dev.lock installs it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from service.testing import REPO, descendants, free_port
from tests.e2e.object_storage import require_module

OBJECT_STORE_BYTES = 200_000_000  # per node: the runs stream, they never hold the dataset


@dataclass
class RayNode:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def raylet_pid(self) -> int:
        for pid in descendants(self.process.pid):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
            except OSError:
                continue
        raise AssertionError(f"{self.name}: no raylet among its processes\n{self.log()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to the node's process group (ours), then SIGKILL to what is left."""
        for signum, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                # its workers may outlive the `ray start` process a moment: the group goes too
                os.killpg(self.process.pid, signal.SIGKILL)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
            break
        self.log_file.close()


@dataclass
class RayCluster:
    log_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    # short: Ray's socket paths live below it
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    nodes: list[RayNode] = field(default_factory=list)
    token: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def client_env(self) -> dict[str, str]:
        """The environment a driver needs to join: the cluster's token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def start_head(self, cpus: int) -> RayNode:
        return self._start("head", ["--head", "--port", str(self.port), "--include-dashboard=false",
                                    "--temp-dir", self.temp_dir], cpus)

    def add_node(self, cpus: int) -> RayNode:
        return self._start(f"node{len(self.nodes)}", ["--address", self.address], cpus)

    def _start(self, name: str, flags: list[str], cpus: int) -> RayNode:
        log_path = self.log_dir / f"ray-{name}.log"
        log_file = log_path.open("wb")
        command = [ray_command(), "start", "--block", *flags, "--num-cpus", str(cpus), "--num-gpus", "0",
                   "--node-ip-address", "127.0.0.1", "--object-store-memory", str(OBJECT_STORE_BYTES),
                   "--disable-usage-stats"]
        process = subprocess.Popen(command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True,
                                   env={**os.environ, **self.env, **self.client_env})
        node = RayNode(name, process, log_path, log_file)
        self.nodes.append(node)
        deadline = time.monotonic() + 240
        while "Ray runtime started" not in node.log():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"ray start {name} failed:\n{node.log()[-3000:]}")
            time.sleep(0.5)
        return node

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def ray_command() -> str:
    require_module("ray", "pip install 'metta-serve[ray]'; requirements-dev.lock pins it")
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.is_file() else shutil.which("ray")
    assert found, "the ray command is installed with the ray package"
    return found


def cluster_environment() -> dict[str, str]:
    """What every node's workers need: this repository importable, Ray quiet."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0"}
