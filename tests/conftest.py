"""Shared fixtures. Markers come from the folder a test lives in (unit / integration / e2e)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from service import testing

# The property tests (hypothesis, schemathesis) replay a fixed set of generated examples, so a run passes
# or fails on the code, not on the draw. METTA_HYPOTHESIS_RANDOM=1 draws new examples every run: that is
# how new cases are found (it found the form-boolean schema mismatch in docs/reliability.md).
settings.register_profile("replay", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("explore" if os.environ.get("METTA_HYPOTHESIS_RANDOM") == "1" else "replay")

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.fspath)).relative_to(REPO / "tests").parts[0]
        if folder in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The shared ImageNet sample photos; tests that need them skip when they are absent."""
    if not (testing.SAMPLE_DIR / "labels.tsv").is_file():
        pytest.skip(f"sample photos not found at {testing.SAMPLE_DIR} (set {testing.SAMPLES_ENV} to their folder)")
    return testing.SAMPLE_DIR


@pytest.fixture(scope="session")
def sample_labels(sample_dir: Path) -> list[tuple[Path, int]]:
    """(photo path, ImageNet class index) for every labelled sample photo, in file order."""
    return testing.sample_labels(sample_dir)
