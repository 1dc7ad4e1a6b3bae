"""/docs and /redoc render with no network: their Swagger UI and ReDoc come from files installed with the
package (fastapi-offline), not from a CDN. Loaded in headless Chromium with every request that is not to
loopback blocked (no name resolves but 127.0.0.1, and every other connection goes to a dead proxy)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest

from service.testing import ServerProcess
from tests.e2e.deploy import find_tool

# At least these; the test expects every operation of the server's own OpenAPI document.
OPERATIONS = ["/healthz", "/readyz", "/metrics", "/v1/models", "/v1/embeddings", "/v1/classify"]


def rendered(url: str, profile: Path) -> str:
    """The page's DOM once its scripts have run (Chromium's virtual time: it waits for the page to settle)."""
    chromium = find_tool("chromium")
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
         "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # no name but loopback resolves
         "--proxy-server=http://127.0.0.1:9",  # and any connection not to loopback goes nowhere
         "--virtual-time-budget=30000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_swagger_ui_lists_every_operation_offline(dummy_server: ServerProcess, tmp_path: Path) -> None:
    page = rendered(dummy_server.url + "/docs", tmp_path / "profile")
    listed = re.findall(r'data-path="([^"]*)"', page)  # one per operation Swagger UI drew
    schema = httpx.get(dummy_server.url + "/openapi.json").json()
    documented = [path for path, operations in schema["paths"].items() for _ in operations]
    assert set(OPERATIONS) <= set(documented)
    assert sorted(listed) == sorted(documented), page[:2000]


def test_redoc_lists_every_operation_offline(dummy_server: ServerProcess, tmp_path: Path) -> None:
    page = rendered(dummy_server.url + "/redoc", tmp_path / "profile")
    assert "metta-serve" in page
    for path in OPERATIONS:
        assert f">{path}<" in page or f"{path}</" in page, (path, page[:2000])


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_pages_name_no_other_host(dummy_server: ServerProcess, path: str) -> None:
    import httpx

    page = httpx.get(dummy_server.url + path, timeout=10).text
    assert not re.search(r"(src|href)=\"(https?:)?//", page), page
