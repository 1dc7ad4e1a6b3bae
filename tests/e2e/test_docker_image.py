"""The container image, built and run for real. Opt-in (`make docker-test` sets METTA_DOCKER_TEST=1):
it needs root, installs Debian's docker.io and debootstrap if missing, and builds a several-GB image.

No registry is reachable here, so the test makes everything it needs, the way an air-gapped site would:
- its own dockerd (own data root, exec root and socket; no bridge, no iptables rules; stopped by PID),
- a Debian bookworm base image from `debootstrap --variant=minbase` + `docker import` (bookworm's
  python3 is 3.11, like python:3.11-slim-bookworm), in place of the default base it cannot pull,
- a wheelhouse of exactly requirements.lock, built on the host (pip inside the build has no index),
  and the image built with `--network none --build-arg PIP_INSTALL_ARGS="--no-index --find-links ..."`.
Base image tarball, wheelhouse and Docker's layer cache persist between runs (METTA_DOCKER_CACHE,
METTA_DOCKER_ROOT), so only the first run on a machine pays for them.

The image installs the whole lock, the CUDA runtime wheels (nvidia-*) included: PyPI's torch 2.14.1
cannot even be imported without them (libtorch_python.so needs libcudnn.so.9, checked), so a CPU test
image "without the GPU bits" would not be the image we ship. docs/deployment.md has the CPU-only route.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.testing import ServerProcess, free_port, start_server

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("METTA_DOCKER_CACHE", "/var/cache/metta-docker"))
DATA_ROOT = Path(os.environ.get("METTA_DOCKER_ROOT", "/var/lib/metta-docker"))
RUN_DIR = Path("/run/metta-docker")  # short: the socket path must stay under 108 bytes
MIRROR = os.environ.get("METTA_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Debian docker.io's own CLI: it matches its daemon (20.10) and builds with BuildKit without buildx.
DOCKER = "/usr/bin/docker"
DOCKERD = "/usr/sbin/dockerd"
BASE_IMAGE = "metta-base:bookworm"
IMAGE = "metta-serve:docker-test"
NAME = "metta-docker-test"  # prefix of every container this test starts
STOP_TIMEOUT_S = 75  # > the image's METTA_SHUTDOWN_GRACE_S (65): SIGKILL only if the drain hangs
READY_AFTER_RESTART_S = 120  # docs/reliability.md: 42–63 s after kill -9 on a loaded 2-core host; room for CI
# The container as the Kubernetes manifests run it (docker/kubernetes/base/deployment.yaml): read-only root
# with /tmp on a tmpfs (the emptyDir), uid/gid 10001 (runAsUser), every capability dropped, no privilege
# escalation.
AS_A_POD = ("--read-only", "--tmpfs", "/tmp", "--user", "10001:10001", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges")

Labels = list[tuple[Path, int]]  # the sample_labels fixture: (photo, class index)

pytestmark = [
    pytest.mark.skipif(os.environ.get("METTA_DOCKER_TEST") != "1",
                       reason="opt-in: METTA_DOCKER_TEST=1 (make docker-test) builds a several-GB image"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: apt-get, and a dockerd of its own"),
    # A cold run builds the base image, the wheelhouse and the image inside the first test's fixtures.
    pytest.mark.timeout(2700),
]


def log(message: str) -> None:
    print(f"[docker-test {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sh(*args: str | Path, check: bool = True, timeout: float = 600,
       **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


class Docker:
    """The docker CLI pointed at our own daemon."""

    def __init__(self, socket: Path) -> None:
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{socket}", "DOCKER_BUILDKIT": "1"}

    def __call__(self, *args: str | Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return sh(DOCKER, *args, check=check, timeout=timeout, env=self.env)

    def inspect(self, container: str, template: str) -> str:
        return self("inspect", "-f", template, container).stdout.strip()

    def logs(self, container: str) -> str:
        result = self("logs", "--tail", "60", container, check=False)
        return result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------- set-up

def install_packages() -> None:
    missing = [pkg for pkg, binary in (("docker.io", DOCKERD), ("debootstrap", "/usr/sbin/debootstrap"))
               if not Path(binary).exists()]
    if missing:
        log(f"apt-get install {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh("apt-get", "update", "-q", env=env)
        sh("apt-get", "install", "-y", "-q", "--no-install-recommends", *missing, env=env)


def stop_pid(pid: int, timeout: float) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)


def stop_leftover_dockerd(pidfile: Path) -> None:
    """A daemon of ours left by an interrupted run holds the pidfile: stop it, by that PID only."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if cmdline and cmdline[0].endswith(b"dockerd") and str(DATA_ROOT).encode() in cmdline:
        log(f"stopping a leftover dockerd of this test (pid {pid})")
        stop_pid(pid, 60)


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    install_packages()
    for folder in (CACHE, DATA_ROOT, RUN_DIR):
        folder.mkdir(parents=True, exist_ok=True)
    pidfile, socket = RUN_DIR / "dockerd.pid", RUN_DIR / "docker.sock"
    stop_leftover_dockerd(pidfile)
    # --bridge=none/--iptables=false: the daemon leaves the host's network and firewall alone; the test
    # uses host networking (a loopback port) and --network none only.
    with (CACHE / "dockerd.log").open("ab") as daemon_log:
        daemon = subprocess.Popen(
            [DOCKERD, "--data-root", str(DATA_ROOT), "--exec-root", str(RUN_DIR / "exec"),
             "--pidfile", str(pidfile), "--host", f"unix://{socket}", "--bridge=none", "--iptables=false",
             "--ip-forward=false", "--ip-masq=false"],
            stdout=daemon_log, stderr=subprocess.STDOUT, start_new_session=True)
    client = Docker(socket)
    try:
        deadline = time.monotonic() + 90
        while client("version", check=False, timeout=30).returncode != 0:
            assert daemon.poll() is None, f"dockerd exited {daemon.returncode}: see {CACHE / 'dockerd.log'}"
            assert time.monotonic() < deadline, f"dockerd not answering: see {CACHE / 'dockerd.log'}"
            time.sleep(0.5)
        remove_containers(client)
        yield client
    finally:
        if daemon.poll() is None:
            remove_containers(client)
            client("image", "prune", "-f", check=False)  # images the tag moved away from
        stop_pid(daemon.pid, 60)
        daemon.wait(10)
        # dockerd leaves its network-namespace mount behind; unmount it so the folder can be deleted.
        for line in Path("/proc/mounts").read_text().splitlines():
            mountpoint = line.split()[1]
            if mountpoint.startswith(f"{RUN_DIR}/"):
                subprocess.run(["umount", mountpoint], check=False, capture_output=True)


def remove_containers(client: Docker) -> None:
    names = client("ps", "-aq", "--filter", f"name={NAME}", check=False).stdout.split()
    if names:
        client("rm", "-f", *names, check=False)


@pytest.fixture(scope="module")
def base_image(docker: Docker) -> str:
    """Debian bookworm minbase + python3 + venv, imported once and cached as a tarball."""
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    tarball = CACHE / "base-bookworm.tar"
    if not tarball.exists():
        rootfs = CACHE / "base-rootfs.tmp"
        shutil.rmtree(rootfs, ignore_errors=True)
        started = time.monotonic()
        log(f"debootstrap bookworm from {MIRROR}")
        sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
           rootfs, MIRROR, timeout=1200)
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        sh("tar", "-C", rootfs, "-cf", f"{tarball}.tmp", ".")
        os.replace(f"{tarball}.tmp", tarball)
        shutil.rmtree(rootfs)
        log(f"base rootfs made in {time.monotonic() - started:.0f} s")
    docker("import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["/bin/bash"]', tarball, BASE_IMAGE)
    return BASE_IMAGE


@pytest.fixture(scope="module")
def wheelhouse() -> Iterator[Path]:
    """Wheels of exactly requirements.lock (--no-deps: a lock missing a dependency fails the build),
    rebuilt only when the lock changes, then hard-linked into docker/wheelhouse/ (the build context)."""
    lock = REPO / "requirements.lock"
    cache = CACHE / "wheelhouse"
    stamp = cache / ".requirements.lock.sha256"
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    if not stamp.is_file() or stamp.read_text() != digest:
        started = time.monotonic()
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        log("building the wheelhouse from requirements.lock")
        sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--wheel-dir", cache, "-r", lock, timeout=1800)
        stamp.write_text(digest)
        log(f"wheelhouse built in {time.monotonic() - started:.0f} s")
    target = REPO / "docker" / "wheelhouse"
    linked = []
    for wheel in target.glob("*.whl"):
        wheel.unlink()
    for wheel in sorted(cache.glob("*.whl")):
        try:
            os.link(wheel, target / wheel.name)
        except OSError:  # another filesystem
            shutil.copy2(wheel, target / wheel.name)
        linked.append(target / wheel.name)
    try:
        yield target
    finally:
        for wheel in linked:
            wheel.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def image(docker: Docker, base_image: str, wheelhouse: Path) -> str:
    started = time.monotonic()
    log(f"docker build {IMAGE} (log: {CACHE / 'build.log'})")
    result = docker("build", "--network", "none", "--progress", "plain",
                    "--build-arg", f"BASE_IMAGE={base_image}",
                    "--build-arg", "PIP_INSTALL_ARGS=--no-index --find-links /wheelhouse",
                    "-t", IMAGE, REPO, check=False, timeout=2400)
    (CACHE / "build.log").write_text(result.stdout + result.stderr)
    # BuildKit keeps a copy of each build context (3 GB with the wheels) per checkout folder; CI clones
    # to a new folder every run, so drop them. Layer cache stays: the dependency step is keyed by the
    # wheels' content, not their path, and stays cached (the next run only re-sends the context, ~1 min).
    docker("builder", "prune", "-f", "--filter", "type=source.local", check=False)
    assert result.returncode == 0, f"docker build failed:\n{result.stderr[-6000:]}"
    size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout) / 2**30
    log(f"image built in {time.monotonic() - started:.0f} s, {size:.2f} GiB")
    return IMAGE


def wait_ready(url: str, docker: Docker, container: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert docker.inspect(container, "{{.State.Running}}") == "true", f"container exited:\n{docker.logs(container)}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"container not ready within {timeout} s:\n{docker.logs(container)}")


@pytest.fixture(scope="module")
def container(docker: Docker, image: str) -> str:
    """The image as deployed (AS_A_POD): read-only root, /tmp on tmpfs, uid 10001, no capabilities, on a
    loopback port. The host's network namespace (METTA_HOST/METTA_PORT pick the address) because this
    daemon has no bridge; the HEALTHCHECK reads the same METTA_PORT."""
    port = free_port()
    name = f"{NAME}-main"
    docker("run", "-d", "--name", name, "--network", "host", *AS_A_POD, "--health-interval", "2s",
           "-e", "METTA_HOST=127.0.0.1", "-e", f"METTA_PORT={port}", "-e", "METTA_DEVICE=cpu", image)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, docker, name)
    return url


@pytest.fixture(scope="module")
def host_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The same service from the venv on the host: the reference the container must agree with."""
    proc = start_server(tmp_path_factory.mktemp("host"), "--model", "efficientnet_lite0", "--device", "cpu")
    yield proc
    assert proc.terminate() == 0, proc.log()


# ---------------------------------------------------------------------------------------------- tests

def test_embeddings_match_the_host(container: str, host_server: ServerProcess, sample_labels: Labels) -> None:
    photos = [base64.b64encode(path.read_bytes()).decode() for path, _ in sample_labels[:2]]
    cases = ({"samples": 8, "policy": "crop_flip", "seed": 1}, {"samples": 4, "policy": "multiscale", "seed": 7})
    for options in cases:
        body = {"images": photos, **options}
        replies = []
        for url in (host_server.url, container):
            reply = httpx.post(f"{url}/v1/embeddings", json=body, timeout=300)
            assert reply.status_code == 200, reply.text
            replies.append(reply.json())
        host, boxed = replies
        assert boxed["model"] == host["model"] == "efficientnet_lite0"
        assert boxed["model_fingerprint"] == host["model_fingerprint"]
        assert boxed["dim"] == host["dim"] == 1280
        asked = (options["samples"], options["seed"])
        assert (boxed["samples"], boxed["seed"]) == (host["samples"], host["seed"]) == asked
        for a, b in zip(host["data"], boxed["data"], strict=True):
            x, y = np.asarray(a["embedding"]), np.asarray(b["embedding"])
            cosine = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
            assert cosine >= 0.9999, (options, a["index"], cosine)


def test_runs_as_non_root_on_a_read_only_root(container: str, docker: Docker) -> None:
    name = f"{NAME}-main"
    assert docker.inspect(name, "{{.Config.User}}") == "10001:10001"
    assert docker("exec", name, "id", "-u").stdout.strip() == "10001"
    # The server process itself (PID 1), not only an exec'd shell.
    status = docker("exec", name, "cat", "/proc/1/status").stdout
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == ["10001"] * 4, uid_line
    # --cap-drop ALL empties the bounding set (a non-root process has no effective capabilities anyway)
    bounding = next(line for line in status.splitlines() if line.startswith("CapBnd:"))
    assert int(bounding.split()[1], 16) == 0, f"capabilities left: {bounding}"
    assert docker.inspect(name, "{{.HostConfig.CapDrop}}") in ("[ALL]", "[all]")
    assert docker.inspect(name, "{{.HostConfig.ReadonlyRootfs}}") == "true"
    denied = docker("exec", name, "python", "-c", "open('/opt/venv/x', 'w')", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied.stderr


def test_model_loads_send_no_openvino_telemetry(container: str, docker: Docker) -> None:
    """OpenVINO's converter decides as below (its own call, openvino/tools/ovc/telemetry_utils.py) whether to
    send usage events from a forked process at each model load; in the image the answer is no."""
    probe = ("import openvino_telemetry as tm; print(tm.Telemetry(tid='probe', app_name='probe', app_version='0', "
             "backend='ga4', enable_opt_in_dialog=False, disable_in_ci=True).consent)")
    assert docker("exec", f"{NAME}-main", "python", "-c", probe).stdout.strip() == "False"
    client_ids = docker("exec", f"{NAME}-main", "find", "/tmp", "/opt/metta-home", "-name", "openvino_ga_*")
    assert client_ids.stdout.strip() == "", client_ids.stdout  # the service's own load wrote no client id


def test_healthcheck_reports_healthy(container: str, docker: Docker) -> None:
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline:
        status = docker.inspect(f"{NAME}-main", "{{.State.Health.Status}}")
        if status == "healthy":
            return
        time.sleep(1)
    raise AssertionError(f"health status {status!r}: {docker.inspect(f'{NAME}-main', '{{json .State.Health}}')}")


def test_serves_offline_with_weights_inside_the_image(image: str, docker: Docker) -> None:
    """No network at all: /readyz (model loaded and warmed up) asked from inside the container."""
    name = f"{NAME}-offline"
    docker("run", "-d", "--name", name, "--network", "none", *AS_A_POD, image)
    probe = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status)"
    deadline = time.monotonic() + 300
    while docker("exec", name, "python", "-c", probe, check=False).stdout.strip() != "200":
        assert docker.inspect(name, "{{.State.Running}}") == "true", docker.logs(name)
        assert time.monotonic() < deadline, docker.logs(name)
        time.sleep(1)
    docker("stop", "-t", str(STOP_TIMEOUT_S), name, timeout=STOP_TIMEOUT_S + 30)
    assert docker.inspect(name, "{{.State.ExitCode}}") == "0", docker.logs(name)


def test_sigterm_drains_in_flight_work_and_exits_zero(container: str, docker: Docker, sample_labels: Labels) -> None:
    """`docker stop` (SIGTERM to PID 1) while a big request runs: it is answered, then exit code 0."""
    name = f"{NAME}-main"
    photo = base64.b64encode(sample_labels[0][0].read_bytes()).decode()
    outcome: dict[str, object] = {}

    def post() -> None:
        try:
            reply = httpx.post(f"{container}/v1/embeddings", json={"images": [photo], "samples": 64, "seed": 3},
                               timeout=120)
            outcome["status"] = reply.status_code
        except httpx.HTTPError as error:
            outcome["error"] = repr(error)

    sender = threading.Thread(target=post)
    sender.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sender.is_alive():
        metrics = httpx.get(f"{container}/metrics", timeout=5).text
        if "\nmetta_inflight_requests 1.0" in metrics:
            break
        time.sleep(0.02)
    started = time.monotonic()
    docker("stop", "-t", str(STOP_TIMEOUT_S), name, timeout=STOP_TIMEOUT_S + 30)
    stopped_in = time.monotonic() - started
    sender.join(120)
    assert outcome == {"status": 200}, (outcome, docker.logs(name))
    assert docker.inspect(name, "{{.State.ExitCode}}") == "0", docker.logs(name)
    assert docker.inspect(name, "{{.State.OOMKilled}}") == "false"
    assert stopped_in < STOP_TIMEOUT_S, f"took {stopped_in:.1f} s: killed, not drained"
    log(f"stopped in {stopped_in:.1f} s with a request in flight")


def test_a_restart_policy_brings_the_service_back_after_its_process_is_killed(image: str, docker: Docker) -> None:
    """Crash-only: the main process killed from the host (kill -9 of the container's PID 1, as an OOM kill or a
    crash does; `docker kill` would count as a manual stop and not be restarted) → exit 137 → the restart
    policy starts it again, and it is ready within the documented time (docs/reliability.md)."""
    name, port = f"{NAME}-restart", free_port()
    docker("run", "-d", "--name", name, "--network", "host", *AS_A_POD, "--restart", "on-failure",
           "-e", "METTA_HOST=127.0.0.1", "-e", f"METTA_PORT={port}", "-e", "METTA_DEVICE=cpu", image)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, docker, name)
        pid = int(docker.inspect(name, "{{.State.Pid}}"))
        assert pid > 0, f"no PID for {name}: {docker.inspect(name, '{{json .State}}')}"
        assert docker.inspect(name, "{{.RestartCount}}") == "0"
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        deadline = killed_at + 60
        while True:  # the restart: a new PID 1, RestartCount 1 (not wait_ready: it fails on a stopped container)
            state = docker("inspect", "-f", "{{.RestartCount}} {{.State.Running}} {{.State.Pid}}", name, check=False)
            fields = state.stdout.split()
            if len(fields) == 3 and fields[0] != "0" and fields[1] == "true" and int(fields[2]) not in (0, pid):
                break
            assert time.monotonic() < deadline, (
                f"not restarted within 60 s of kill -9 (restart count, running, pid: {state.stdout.strip()!r}, "
                f"exit code {docker.inspect(name, '{{.State.ExitCode}}')}):\n{docker.logs(name)}")
            time.sleep(0.2)
        restarted_in = time.monotonic() - killed_at
        wait_ready(url, docker, name, timeout=READY_AFTER_RESTART_S)
        ready_in = time.monotonic() - killed_at
        reply = httpx.get(f"{url}/v1/models", timeout=10)
        assert reply.status_code == 200, reply.text
        log(f"kill -9 of pid {pid}: restarted in {restarted_in:.1f} s, ready in {ready_in:.1f} s")
    finally:
        docker("rm", "-f", name, check=False)
