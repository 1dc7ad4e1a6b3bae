"""`metta` loads only what its subcommand needs: `--help` and `embed --server URL` run without torch (as a
client machine may have none), and `evaluation/` is loaded by `metta eval` only. Checked as the client's
own test does: torch made unimportable in a fresh interpreter."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from service.testing import REPO, start_server

WITHOUT_TORCH = ("import sys; sys.modules['torch'] = None\n"  # `import torch` now raises ImportError
                 "from service.cli import main\n"
                 "try:\n"
                 "    main(sys.argv[1:])\n"
                 "finally:\n"
                 "    loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'evaluation') "
                 "and sys.modules[m] is not None)\n"
                 "    print('loaded:', loaded, file=sys.stderr)\n")


def metta_without_torch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_help_loads_no_subcommand() -> None:
    for args in (["--help"], ["embed", "--help"]):
        done = metta_without_torch(*args)
        assert done.returncode == 0, done.stderr
        assert "loaded: []" in done.stderr, done.stderr
    assert "embed" in done.stdout and "--server" in done.stdout
    listing = metta_without_torch("--help")
    assert "embed" in listing.stdout and "eval" in listing.stdout


def test_embed_with_a_server_runs_without_torch(tmp_path: Path) -> None:
    photo = tmp_path / "cat.png"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(buffer, "PNG")
    photo.write_bytes(buffer.getvalue())
    server = start_server(tmp_path, "--model", "dummy", "--device", "cpu")
    try:
        done = metta_without_torch("embed", str(photo), "--server", server.url, "--samples", "2",
                                   "--out", str(tmp_path / "out.parquet"))
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert "loaded: []" in done.stderr, done.stderr
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 1
