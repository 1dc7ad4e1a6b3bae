"""The README's library example runs as written (on a photo made here, as `cat.jpg`)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_library_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    section = README.read_text().split("## As a library and a CLI", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S)
    assert example is not None, "no python example under 'As a library and a CLI'"
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(example.group(1), "README.md", "exec"), namespace)  # the example exactly as documented
    result = namespace["result"]
    assert result.embeddings.shape == (1, 1280) and result.variances.shape == (1, 1280)  # type: ignore[attr-defined]
