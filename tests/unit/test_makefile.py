"""The Makefile as a newcomer meets it: `make help` lists every target, lint checks every code folder,
`make serve` sends no OpenVINO telemetry."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from service.testing import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str) -> str:
    done = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "VENV": ".venv"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_help_lists_every_target_with_a_line() -> None:
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.MULTILINE))
    listed = set(re.findall(r"^  make (\S+)\s+\S", make("help"), re.MULTILINE))
    assert listed == targets, f"targets without a help line: {sorted(targets - listed)}"


def test_lint_runs_ruff_and_mypy_over_the_same_code_folders() -> None:
    commands = make("-n", "-o", ".venv/.installed-stamp", "lint").splitlines()
    ruff = next(line for line in commands if "ruff check" in line).split("ruff check", 1)[1].split()
    mypy = next(line for line in commands if "mypy" in line).split("mypy", 1)[1].split()
    code = {"service", "models", "evaluation", "tests", "bench"}
    assert set(ruff) == code and set(mypy) == code
    # A bare `mypy` (what the landing checks run) covers the same folders.
    configured = re.search(r"^files = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert configured and set(re.findall(r'"([^"]+)"', configured.group(1))) == code


def test_make_serve_opts_out_of_openvino_telemetry() -> None:
    serve = make("-n", "-o", ".venv/.installed-stamp", "serve")
    assert "CI=true" in serve and "metta-serve" in serve  # OpenVINO's consent check declines in CI
