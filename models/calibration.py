"""Shipped temperatures for the classifier head: one per (model, weights, policy, S bucket).

Mean embeddings over more views make sharper or flatter logits depending on the policy, so one
temperature per S bucket (1 / 2–4 / 5–16 / 17+) is fitted by NLL on the sample photos and shipped
in `calibration.json` beside this module (`python -m evaluation.calibrate` regenerates it). A
combination with no fitted temperature gets T = 1 and `calibrated = False`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
S_BUCKETS: tuple[tuple[int, int | None, str], ...] = ((1, 1, "1"), (2, 4, "2-4"), (5, 16, "5-16"), (17, None, "17+"))


def s_bucket(samples: int) -> str:
    """S → its calibration bucket's name: '1', '2-4', '5-16' or '17+'."""
    for low, high, name in S_BUCKETS:
        if samples >= low and (high is None or samples <= high):
            return name
    raise ValueError(f"samples must be at least 1, got {samples}")


@dataclass(frozen=True)
class Temperature:
    value: float
    calibrated: bool


UNCALIBRATED = Temperature(1.0, False)


@cache
def load_calibration(path: Path = CALIBRATION_FILE) -> tuple[dict[str, Any], ...]:
    """The fitted entries; none when the file is absent (then every lookup is uncalibrated)."""
    if not path.is_file():
        return ()
    data = json.loads(path.read_text())
    return tuple(data.get("models", []))


def temperature_for(model: str, weights_sha: str, policy: str, samples: int,
                    entries: tuple[dict[str, Any], ...] | None = None) -> Temperature:
    """The temperature fitted for exactly this model name, weights digest, policy and S bucket."""
    for entry in load_calibration() if entries is None else entries:
        if entry.get("model") != model or entry.get("weights_sha256") != weights_sha:
            continue
        value = entry.get("temperatures", {}).get(policy, {}).get(s_bucket(samples))
        if isinstance(value, int | float) and value > 0:
            return Temperature(float(value), True)
    return UNCALIBRATED
