"""Read the service's own Prometheus histograms back: deltas between two scrapes, quantiles, means."""

from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

Labels = dict[str, str]


def histogram(text: str, name: str, match: Callable[[Labels], bool] = lambda labels: True) -> dict[str, float]:
    """{'le=<bound>': cumulative count, ..., 'sum': s, 'count': n} of one histogram, summed over matching labels."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            if not match(labels):
                continue
            if sample.name.endswith("_bucket"):
                key = "le=" + sample.labels["le"]
            elif sample.name.endswith("_sum"):
                key = "sum"
            elif sample.name.endswith("_count"):
                key = "count"
            else:
                continue
            out[key] = out.get(key, 0.0) + sample.value
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def quantile(hist: dict[str, float], q: float) -> tuple[float, float, float]:
    """Prometheus' histogram_quantile (linear within the bucket) and the bucket's (low, high) bounds."""
    bounds = sorted((float(k[3:]), v) for k, v in hist.items() if k.startswith("le="))
    total = hist.get("count", bounds[-1][1] if bounds else 0.0)
    if not bounds or total <= 0:
        return math.nan, math.nan, math.nan
    rank, low, below = q * total, 0.0, 0.0
    for bound, cumulative in bounds:
        if cumulative >= rank:
            if math.isinf(bound):
                return low, low, bound
            inside = cumulative - below
            return low + (bound - low) * ((rank - below) / inside if inside else 0.0), low, bound
        low, below = bound, cumulative
    return math.nan, math.nan, math.nan


def mean(hist: dict[str, float]) -> float:
    return hist["sum"] / hist["count"] if hist.get("count") else math.nan
