"""The deployment configuration checked with the real tools: promtool, hadolint, the Compose spec, a live
`/metrics` page. Each tool that is missing skips its test with the package that provides it."""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from service.testing import ServerProcess
from tests.e2e.deploy import (
    DASHBOARD,
    GRAFANA_DIR,
    PROMETHEUS_DIR,
    REPO,
    alert_rules,
    dashboard_queries,
    exported_series_names,
    find_tool,
    load_yaml,
    metric_names,
    recording_rule_names,
)

COMPOSE_FILES = [REPO / "docker-compose.yml", REPO / "docker-compose.gpu.yml"]


def run(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], input=stdin, capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def live_metrics(dummy_server: ServerProcess) -> str:
    """/metrics after one embedding request, so the labelled histograms have samples to lint too."""
    buffer = io.BytesIO()
    Image.new("RGB", (96, 80), (120, 30, 200)).save(buffer, format="PNG")
    image = ("images", ("a.png", buffer.getvalue(), "image/png"))
    reply = httpx.post(f"{dummy_server.url}/v1/embeddings", files=[image], data={"samples": "4", "seed": "1"},
                       timeout=60)
    assert reply.status_code == 200, reply.text
    metrics = httpx.get(f"{dummy_server.url}/metrics", timeout=10)
    assert metrics.status_code == 200
    return metrics.text


# ------------------------------------------------------------------------------------------------ promtool

def test_promtool_check_config() -> None:
    assert_ok(run(find_tool("promtool"), "check", "config", PROMETHEUS_DIR / "prometheus.yml"))


def test_promtool_check_rules() -> None:
    result = run(find_tool("promtool"), "check", "rules", PROMETHEUS_DIR / "recording_rules.yml",
                 PROMETHEUS_DIR / "alert_rules.yml")
    assert_ok(result)
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules() -> None:
    result = run(find_tool("promtool"), "test", "rules", PROMETHEUS_DIR / "tests" / "rules_test.yml")
    assert_ok(result)
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_test_case() -> None:
    cases = load_yaml(PROMETHEUS_DIR / "tests" / "rules_test.yml")["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert len(alerts) >= 5
    assert alerts - fires == set(), "alerts without a test case where they fire"
    assert alerts - quiet == set(), "alerts without a test case where they stay quiet"


def test_promtool_check_metrics_on_live_metrics(live_metrics: str) -> None:
    result = run(find_tool("promtool"), "check", "metrics", stdin=live_metrics)
    assert_ok(result)


def test_prometheus_scrapes_the_compose_service() -> None:
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "metta-serve")
    compose = load_yaml(REPO / "docker-compose.yml")
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    assert targets == ["metta-serve:8000"]
    assert "metta-serve" in compose["services"]
    assert all((PROMETHEUS_DIR / path).is_file() for path in config["rule_files"])


# ------------------------------------------------------------------------------------------------ names

def test_rules_name_only_exported_or_recorded_metrics(live_metrics: str) -> None:
    known = exported_series_names(live_metrics) | recording_rule_names() | {"up"}
    rules = load_yaml(PROMETHEUS_DIR / "recording_rules.yml")["groups"]
    exprs = [rule["expr"] for group in rules for rule in group["rules"]] + [r["expr"] for r in alert_rules()]
    for expr in exprs:
        assert metric_names(expr), expr
        assert metric_names(expr) <= known, f"unknown metric in {expr!r}: {metric_names(expr) - known}"


def test_dashboard_queries_name_only_exported_or_recorded_metrics(live_metrics: str) -> None:
    known = exported_series_names(live_metrics) | recording_rule_names()
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 10
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= known, f"panel {title!r} queries unknown {names - known} in {expr!r}"


def test_metric_name_parser() -> None:
    # Guards the check above: it must see through functions, grouping, matchers and ranges.
    expr = ('histogram_quantile(0.95, sum by (job, le) (rate(a_bucket{x="y{z}"}[1m]))) '
            '/ on(job) group_left b:c:d or vector(0) > bool 1')
    assert metric_names(expr) == {"a_bucket", "b:c:d"}


# ------------------------------------------------------------------------------------------------ Grafana

REQUIRED_PANEL_QUERIES = {
    # what the dashboard must show → a series one of its panels must query
    "latency p50 by S": "samples:metta_request_duration_seconds:p50_1m",
    "latency p95 by S": "samples:metta_request_duration_seconds:p95_1m",
    "latency p99 by S": "samples:metta_request_duration_seconds:p99_1m",
    "crops/s": "job:metta_crops:rate1m",
    "images/s": "job:metta_images:rate1m",
    "batch fill": "job:metta_batch_crops:mean1m",
    "queue depth": "metta_queue_crops",
    "rejections by reason": "job_reason:metta_rejected:rate1m",
    "per-stage time": "job_stage:metta_stage_duration_seconds:mean1m",
}


def test_dashboard_has_the_required_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for _, expr in dashboard_queries(dashboard) for name in metric_names(expr)}
    missing = {what for what, series in REQUIRED_PANEL_QUERIES.items() if series not in queried}
    assert missing == set(), f"dashboard lacks panels for {missing}"
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    for wanted in ("Latency p50 by S", "Latency p95 by S", "Latency p99 by S", "Throughput", "Batch fill",
                   "Queue depth", "Rejections by reason", "Time per stage (mean)"):
        assert wanted in titles
    # Latency panels show one line per S bucket.
    for panel in dashboard["panels"]:
        if panel["title"].startswith("Latency"):
            assert all("{{samples}}" in target["legendFormat"] for target in panel["targets"])


def test_grafana_provisioning_matches_dashboard_and_compose() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    assert uids == {datasource["uid"]}
    provider = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "metta-serve.yml")["providers"][0]
    grafana = load_yaml(REPO / "docker-compose.yml")["services"]["grafana"]
    mounts = {volume.split(":")[1] for volume in grafana["volumes"] if volume.startswith("./")}
    assert provider["options"]["path"] in mounts
    assert "/etc/grafana/provisioning" in mounts


# ------------------------------------------------------------------------------------------------ Docker

def test_dockerfile_passes_hadolint() -> None:
    assert_ok(run(find_tool("hadolint"), REPO / "Dockerfile"))


def test_image_and_compose_drain_as_long_as_the_settings_default() -> None:
    """The drain outlasts the longest admitted request (request_timeout_s); the stop timeout outlasts the drain."""
    from service.settings import Settings

    settings = Settings()
    assert settings.shutdown_grace_s >= settings.request_timeout_s
    image = re.search(r"METTA_SHUTDOWN_GRACE_S=(\d+)", (REPO / "Dockerfile").read_text())
    assert image and float(image.group(1)) == settings.shutdown_grace_s, "the image's grace is the settings' default"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["metta-serve"]
    assert float(compose["environment"]["METTA_SHUTDOWN_GRACE_S"]) == settings.shutdown_grace_s
    assert float(compose["stop_grace_period"].rstrip("s")) >= settings.shutdown_grace_s + 10


def test_dockerfile_basics() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^USER \$\{APP_UID\}:\$\{APP_UID\}$", text, re.MULTILINE)
    assert "ARG APP_UID=10001" in text
    for line in ("EXPOSE 8000", "STOPSIGNAL SIGTERM", "HEALTHCHECK", "/healthz",
                 "ARG BASE_IMAGE=python:3.11-slim-bookworm"):
        assert line in text
    assert text.count("FROM ") >= 2, "multi-stage"
    assert "curl" not in text.split("HEALTHCHECK", 1)[1].split("\n\n", 1)[0]
    # the dependency layer comes before the code is copied, so code edits do not reinstall wheels
    assert text.index("requirements.lock") < text.index("COPY service")


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_validates_against_the_compose_spec(path: Path) -> None:
    assert_ok(run(find_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", path))


@pytest.mark.parametrize("files", [COMPOSE_FILES[:1], COMPOSE_FILES], ids=["cpu", "cpu+gpu"])
def test_docker_compose_config(files: list[Path]) -> None:
    args = [a for f in files for a in ("-f", f)]
    assert_ok(run(find_tool("docker-compose"), *args, "config", "-q"))
    rendered = run(find_tool("docker-compose"), *args, "config")
    assert_ok(rendered)
    config = yaml.safe_load(rendered.stdout)
    for name, service in config["services"].items():
        for port in service.get("ports", []):
            host_ip = port["host_ip"] if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
    serve = config["services"]["metta-serve"]
    grace = float(serve["environment"]["METTA_SHUTDOWN_GRACE_S"])
    assert float(serve["stop_grace_period"].rstrip("s")) > grace, "compose must wait longer than the drain"
    assert serve["read_only"] is True
    gpu = serve.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert bool(gpu) == (len(files) == 2), "GPU reservation only with the override"


def test_composes_cpu_service_builds_the_cpu_only_image_the_kubernetes_cpu_overlay_expects() -> None:
    cpu = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["metta-serve"]
    gpu = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())["services"]["metta-serve"]
    assert cpu["build"]["args"]["TORCH_INDEX_URL"].endswith("-https://download.pytorch.org/whl/cpu}")
    assert cpu["image"].endswith(":cpu") and gpu["image"].endswith(":latest")
    assert gpu["build"]["args"]["TORCH_INDEX_URL"] == ""  # the CUDA build from PyPI
    overlay = yaml.safe_load((REPO / "docker/kubernetes/overlays/cpu/kustomization.yaml").read_text())
    assert overlay["images"][0]["newTag"].endswith("-cpu")
