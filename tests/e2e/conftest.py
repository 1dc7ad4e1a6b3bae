"""Shared e2e fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.testing import ServerProcess, start_server


@pytest.fixture(scope="module")
def dummy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real metta-serve process with the fast test model (metric families do not depend on the model)."""
    proc = start_server(tmp_path_factory.mktemp("server"), "--model", "dummy", "--device", "cpu")
    yield proc
    assert proc.terminate() == 0, proc.log()
