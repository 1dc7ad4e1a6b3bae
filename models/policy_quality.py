"""What the quality study measured per policy, for each task: read from `policy_quality.json`.

The one place these figures live: `GET /v1/models` serves them and the README's table is rendered
from them (a test checks it). `python -m evaluation.calibrate` measures and rewrites the file.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

POLICY_QUALITY_FILE = Path(__file__).with_name("policy_quality.json")


@cache
def load_policy_quality(path: Path = POLICY_QUALITY_FILE) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def policy_figures(model: str, weights_sha: str) -> list[dict[str, Any]]:
    """The study's rows for this model and weights; none when they were not measured."""
    entry = load_policy_quality().get("models", {}).get(model)
    if not entry or entry.get("weights_sha256") != weights_sha:
        return []
    rows: list[dict[str, Any]] = entry.get("rows", [])
    return rows


def markdown_table(model: str) -> str:
    """The README's table of the study's rows (classification and retrieval side by side)."""
    entry = load_policy_quality().get("models", {}).get(model, {})
    lines = ["| views | top-1 % | Δ top-1 pt [95 %] | NLL (T=1) | NLL (calibrated) | Δ NLL [95 %] | ECE "
             "| AUROC of max_probability | near-duplicate recall@1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in entry.get("rows", []):
        versus = row.get("vs_center") or {}
        lines.append(f"| {row['views']} | {_number(row, 'top1', 1, 100)} | {_interval(versus.get('top1'), 1, 100)} | "
                     f"{_number(row, 'nll', 3)} | {_number(row, 'nll_calibrated', 3)} | "
                     f"{_interval(versus.get('nll_calibrated'), 3)} | {_number(row, 'ece', 3)} | "
                     f"{_number(row, 'max_probability_auroc', 3)} | {_number(row, 'recall_at_1', 3)} |")
    return "\n".join(lines)


def _interval(difference: dict[str, float] | None, digits: int, scale: float = 1.0) -> str:
    """'+1.2 [−0.4, +2.8]': a paired difference from the central crop and its 95 % interval."""
    if not difference:
        return "—"
    return (f"{difference['diff'] * scale:+.{digits}f} [{difference['lo'] * scale:+.{digits}f}, "
            f"{difference['hi'] * scale:+.{digits}f}]").replace("-", "−")


def _number(row: dict[str, Any], key: str, digits: int, scale: float = 1.0) -> str:
    value = row.get(key)
    return "—" if value is None else f"{value * scale:.{digits}f}"
