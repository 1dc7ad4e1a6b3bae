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


def options_tables() -> dict[str, list[list[str]]]:
    """Every `| option | type | default | meaning |` table of the README, by the heading above it."""
    tables: dict[str, list[list[str]]] = {}
    heading = ""
    in_code = False
    lines = README.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("```"):
            in_code = not in_code
        elif line.startswith("#") and not in_code:
            heading = line.lstrip("#").strip()
        elif line == "| option | type | default | meaning |":
            rows = []
            for row in lines[number + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip().strip("|"))])
            tables[heading] = rows
    return tables


def test_every_options_table_is_its_endpoints_schema() -> None:
    """Each option the schema takes is in its endpoint's table and nothing else is; a fixed default is the
    schema's (a default taken from a setting is named by the setting instead)."""
    from pydantic import BaseModel

    from service.api.schemas import ClassifyOptionsIn, EmbedOptionsIn

    tables = options_tables()
    schemas: dict[str, type[BaseModel]] = {"Use it": EmbedOptionsIn, "Classify: `POST /v1/classify`": ClassifyOptionsIn}
    assert set(tables) == set(schemas), "an options table the test does not know, or one is gone"
    for heading, schema in schemas.items():
        documented: dict[str, str] = {}
        for cells in tables[heading]:
            names = [name.strip().strip("`") for name in cells[0].split(",")]
            defaults = cells[2].split(", ") if len(names) > 1 else [cells[2]]
            documented.update(zip(names, defaults, strict=True))
        assert set(documented) == set(schema.model_fields), heading
        for name, field in schema.model_fields.items():
            if field.default is not None:
                expected = str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
                assert documented[name].strip("`") == expected, (heading, name, documented[name], expected)


def test_the_exit_code_table_is_metta_embeds() -> None:
    """One exit code per row, each the command's own, and every code the command returns has its row."""
    from service.bulk import command

    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| exit code |"))
    documented = []
    for row in lines[start + 2:]:
        if not row.startswith("|"):
            break
        documented.append(int(row.split("|")[1]))
    assert sorted(documented) == sorted({command.OK, command.FAILED, command.USAGE, command.INTERRUPTED})
