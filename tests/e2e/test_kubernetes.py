"""The Kubernetes manifests (docker/kubernetes/), rendered and validated with the real tools.

Every overlay, alone and with each component, renders with `kubectl kustomize`; its core resources pass
`kubernetes-validate --strict` for Kubernetes KUBE_VERSION; its custom resources pass their CRD's published
schema (docker/kubernetes/schemas/, unknown fields refused as `kubectl --validate=strict` would); the
PrometheusRule is what docker/prometheus/ makes and passes `promtool check rules`. Each check also runs on
a deliberately broken input (tests/e2e/fixtures/kubernetes/) and must refuse it. Missing tools skip, and
fail under CI=true (find_tool).
"""

from __future__ import annotations

import copy
import functools
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.settings import Settings
from service.testing import ServerProcess
from tests.e2e.deploy import REPO, exported_series_names, find_tool

KUBE_VERSION = "1.32.0"  # a current release (kubernetes-validate ships its schemas)
K8S = REPO / "docker" / "kubernetes"
SCHEMAS = K8S / "schemas"
FIXTURES = Path(__file__).parent / "fixtures" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
COMPONENTS = ("keda", "prometheus-operator")
# (overlay, components): each overlay alone, with each component, and with both
VARIANTS = [(o, ()) for o in OVERLAYS] + [(o, (c,)) for o in OVERLAYS for c in COMPONENTS] + \
    [(o, COMPONENTS) for o in OVERLAYS]
CRDS = {  # kind → the CRD file kept in schemas/
    "ScaledObject": "keda.sh_scaledobjects.yaml",
    "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
}
CORE_KINDS = {"Namespace", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy",
              "HorizontalPodAutoscaler"}
SCALING_METRICS = {"metta_queue_wait_estimate_seconds", "metta_queue_crops"}

Doc = dict[str, Any]


def variant_id(variant: tuple[str, tuple[str, ...]]) -> str:
    overlay, components = variant
    return "+".join((overlay, *components))


def run(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, cwd=cwd)


def explain(result: subprocess.CompletedProcess[str]) -> str:
    command = shlex.join(map(str, result.args))
    return f"{command} → {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def load_docs(text: str) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def kustomize(folder: Path) -> subprocess.CompletedProcess[str]:
    return run(find_tool("kubectl"), "kustomize", folder)


def render(variant: tuple[str, tuple[str, ...]], workdir: Path) -> list[Doc]:
    """The overlay with its components, as a user deploys it: a kustomization naming both."""
    overlay, components = variant
    folder = K8S / "overlays" / overlay
    if components:
        folder = workdir / variant_id(variant)
        folder.mkdir()
        # kustomize takes relative paths only
        kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                         "resources": [os.path.relpath(K8S / "overlays" / overlay, folder)],
                         "components": [os.path.relpath(K8S / "components" / c, folder) for c in components]}
        (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    result = kustomize(folder)
    assert result.returncode == 0, explain(result)
    return load_docs(result.stdout)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    workdir = tmp_path_factory.mktemp("kustomize")
    return {variant_id(v): render(v, workdir) for v in VARIANTS}


def one(docs: list[Doc], kind: str) -> Doc:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


# ---------------------------------------------------------------------------------------------- validators

def kubernetes_validate(docs: list[Doc], workdir: Path) -> subprocess.CompletedProcess[str]:
    path = workdir / "core.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return run(find_tool("kubernetes-validate"), "--strict", "--kubernetes-version", KUBE_VERSION, "--no-warn",
               path)


def _refuse_unknown_fields(schema: Any) -> Any:
    """A CRD schema as the API server's strict field validation reads it: an object that lists its
    properties and does not preserve unknown fields refuses others (plain JSON Schema would allow them)."""
    if isinstance(schema, dict):
        schema = {key: _refuse_unknown_fields(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_refuse_unknown_fields(item) for item in schema]
    return schema


@functools.cache
def load_crd(name: str) -> Any:
    # C loader where PyYAML has it: KubeRay's CRD is 1.4 MB (it embeds the pod template's schema)
    return yaml.load((SCHEMAS / name).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def crd_schema(kind: str, api_version: str) -> dict[str, Any]:
    crd = load_crd(CRDS[kind])
    group, _, version = api_version.rpartition("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind, (kind, api_version)
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{api_version} is not served by the CRD (served: {sorted(served)})"
    schema = copy.deepcopy(served[version]["schema"]["openAPIV3Schema"])
    # Every object has apiVersion/kind/metadata; the CRD leaves metadata to the API server.
    return dict(_refuse_unknown_fields(schema))


def crd_errors(doc: Doc) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(doc["kind"], doc["apiVersion"]))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def promtool_check(rule: Doc, workdir: Path) -> subprocess.CompletedProcess[str]:
    path = workdir / f"{rule['metadata']['name']}-rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return run(find_tool("promtool"), "check", "rules", path)


def env_of(container: Doc) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def deployment_problems(deployment: Doc) -> list[str]:
    """What docs/deployment.md promises of the Deployment; empty when it holds."""
    problems = []
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    rolling = spec.get("strategy", {}).get("rollingUpdate", {})
    if (spec.get("strategy", {}).get("type"), rolling.get("maxUnavailable"), rolling.get("maxSurge")) != \
            ("RollingUpdate", 0, 1):
        problems.append("strategy: RollingUpdate with maxUnavailable 0, maxSurge 1")
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        if container.get(probe, {}).get("httpGet", {}).get("path") != path:
            problems.append(f"{probe} on {path}")
    startup = container.get("startupProbe", {})
    if startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < 120:
        problems.append("startupProbe allows under 2 minutes for model load and warm-up")
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop = float(command[1]) if len(command) == 2 and command[0] == "sleep" else 0.0
    if pre_stop < 5:
        problems.append("preStop: sleep at least 5 s so endpoints drop the pod before it stops listening")
    env = env_of(container)
    grace = float(env.get("METTA_SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default))
    timeout = float(env.get("METTA_REQUEST_TIMEOUT_S", Settings.model_fields["request_timeout_s"].default))
    if grace < timeout:
        problems.append(f"drain {grace} s is shorter than the longest admitted request ({timeout} s)")
    if pod.get("terminationGracePeriodSeconds", 30) < pre_stop + grace + 5:
        problems.append("terminationGracePeriodSeconds < preStop + drain + 5 s")
    keys = env.get("METTA_API_KEYS")
    if not (isinstance(keys, dict) and "secretKeyRef" in keys):
        problems.append("METTA_API_KEYS from a Secret")
    pod_security = pod.get("securityContext", {})
    security = container.get("securityContext", {})
    if not (pod_security.get("runAsNonRoot") and pod_security.get("runAsUser") == 10001):
        problems.append("pod runs as non-root uid 10001")
    if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("seccomp RuntimeDefault")
    if not security.get("readOnlyRootFilesystem") or security.get("allowPrivilegeEscalation") is not False:
        problems.append("read-only root, no privilege escalation")
    if security.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("all capabilities dropped")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
    if not (tmp and "emptyDir" in volumes.get(tmp[0]["name"], {})):
        problems.append("an emptyDir on /tmp")
    resources = container.get("resources", {})
    if not all(resources.get(k, {}).get(r) for k in ("requests", "limits") for r in ("cpu", "memory")):
        problems.append("cpu and memory requests and limits")
    return problems


# ---------------------------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_each_overlay_and_component_renders(variant: tuple[str, tuple[str, ...]],
                                             rendered: dict[str, list[Doc]]) -> None:
    docs = rendered[variant_id(variant)]
    _, components = variant
    kinds = sorted(doc["kind"] for doc in docs)
    expected = set(CORE_KINDS)
    if "keda" in components:  # the ScaledObject replaces the HPA: never two autoscalers on one Deployment
        expected = (expected - {"HorizontalPodAutoscaler"}) | {"ScaledObject"}
    if "prometheus-operator" in components:
        expected |= {"ServiceMonitor", "PrometheusRule"}
    assert kinds == sorted(expected), "one object of each expected kind"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "metta", doc["metadata"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "metta-serve", doc["kind"]


def test_broken_kustomization_does_not_render() -> None:
    result = kustomize(FIXTURES / "broken-kustomization")
    assert result.returncode != 0, explain(result)
    assert "metta-serv" in result.stderr


# ---------------------------------------------------------------------------------------------- core schemas

@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_core_resources_validate_strictly(variant: tuple[str, tuple[str, ...]], rendered: dict[str, list[Doc]],
                                          tmp_path: Path) -> None:
    core = [doc for doc in rendered[variant_id(variant)] if doc["kind"] in CORE_KINDS]
    result = kubernetes_validate(core, tmp_path)
    assert result.returncode == 0, explain(result)
    assert result.stdout.count("passed") == len(core), explain(result)
    assert f"against version {KUBE_VERSION.rsplit('.', 1)[0]}" in result.stdout


@pytest.mark.parametrize(("index", "reason"), [(0, "'livenesProbe' was unexpected"),
                                               (1, "'eight thousand' is not of type 'integer'"),
                                               (2, "'targetCPUUtilizationPercentage' was unexpected")])
def test_broken_core_resources_fail_strict_validation(index: int, reason: str, tmp_path: Path) -> None:
    doc = load_docs((FIXTURES / "broken-core.yaml").read_text())[index]
    result = kubernetes_validate([doc], tmp_path)
    assert result.returncode != 0, f"{doc['kind']} passed:\n{explain(result)}"
    assert reason in result.stdout + result.stderr, explain(result)


def test_broken_deployment_fails_the_deployment_checks() -> None:
    deployment = one(load_docs((FIXTURES / "broken-core.yaml").read_text()), "Deployment")
    problems = deployment_problems(deployment)
    for expected in ("strategy", "livenessProbe", "preStop", "terminationGracePeriodSeconds", "read-only root",
                     "all capabilities dropped", "an emptyDir on /tmp", "METTA_API_KEYS"):
        assert any(expected in problem for problem in problems), (expected, problems)


# ---------------------------------------------------------------------------------------------- custom resources

@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[1]], ids=variant_id)
def test_custom_resources_validate_against_their_crds(variant: tuple[str, tuple[str, ...]],
                                                      rendered: dict[str, list[Doc]]) -> None:
    custom = [doc for doc in rendered[variant_id(variant)] if doc["kind"] not in CORE_KINDS]
    assert custom and {doc["kind"] for doc in custom} <= set(CRDS)
    for doc in custom:
        assert crd_errors(doc) == [], doc["kind"]


@pytest.mark.parametrize(("index", "reason"), [(0, "'scaleTargetRef' is a required property"),
                                               (1, "is not of type 'array'"),
                                               (2, "'exprr' was unexpected")])
def test_broken_custom_resources_fail_their_crds(index: int, reason: str) -> None:
    doc = load_docs((FIXTURES / "broken-custom.yaml").read_text())[index]
    errors = crd_errors(doc)
    assert any(reason in error for error in errors), (doc["kind"], errors)


def test_strict_crd_schema_refuses_unknown_fields_but_keeps_preserved_ones() -> None:
    schema = _refuse_unknown_fields({"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {}}}})
    validator = jsonschema.Draft7Validator(schema)
    assert validator.is_valid({"a": {"b": "x"}, "free": {"anything": 1}})
    assert not validator.is_valid({"a": {"b": "x", "c": 1}})
    assert not validator.is_valid({"a": {}, "extra": 1})


# ---------------------------------------------------------------------------------------------- rules

def test_prometheus_rule_is_generated_from_docker_prometheus(tmp_path: Path) -> None:
    generator = K8S / "generate_rules.py"
    result = run(sys.executable, generator, "--check")
    assert result.returncode == 0, explain(result)
    # The same check refuses a stale copy: one rule file edited after the PrometheusRule was made.
    stale = tmp_path / "prometheus"
    stale.mkdir()
    for name in ("recording_rules.yml", "alert_rules.yml"):
        (stale / name).write_text((REPO / "docker" / "prometheus" / name).read_text())
    (stale / "alert_rules.yml").write_text((stale / "alert_rules.yml").read_text().replace("for: 5m", "for: 7m", 1))
    result = run(sys.executable, generator, "--check", "--prometheus-dir", stale)
    assert result.returncode == 1, explain(result)
    generated = load_docs((K8S / "components" / "prometheus-operator" / "prometheusrule.yaml").read_text())[0]
    sources = [yaml.safe_load((REPO / "docker" / "prometheus" / n).read_text())["groups"]
               for n in ("recording_rules.yml", "alert_rules.yml")]
    assert generated["spec"]["groups"] == sources[0] + sources[1]


def test_promtool_checks_the_prometheus_rule(rendered: dict[str, list[Doc]], tmp_path: Path) -> None:
    rule = one(rendered["cpu+prometheus-operator"], "PrometheusRule")
    result = promtool_check(rule, tmp_path)
    assert result.returncode == 0, explain(result)
    assert "SUCCESS" in result.stdout


def test_promtool_refuses_the_broken_rule(tmp_path: Path) -> None:
    rule = one(load_docs((FIXTURES / "broken-rules.yaml").read_text()), "PrometheusRule")
    assert crd_errors(rule) == [], "the fixture is meant to pass the schema and fail only promtool"
    result = promtool_check(rule, tmp_path)
    assert result.returncode != 0, explain(result)


# ---------------------------------------------------------------------------------------------- promises

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_as_documented(overlay: str, rendered: dict[str, list[Doc]]) -> None:
    deployment = one(rendered[overlay], "Deployment")
    assert deployment_problems(deployment) == []
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    resources = container["resources"]
    env = env_of(container)
    if overlay == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert env["METTA_DEVICE"] == "cuda"
        # batching is left to the service's per-device defaults
        assert not {"METTA_MAX_BATCH_CROPS", "METTA_CHUNK_CROPS", "METTA_MAX_WAIT_MS"} & set(env)
    else:
        assert "nvidia.com/gpu" not in resources["limits"]
        assert env["METTA_DEVICE"] == "cpu"
    assert container["image"].startswith("registry.example.com/metta-serve:")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_and_ports_meet(overlay: str, rendered: dict[str, list[Doc]]) -> None:
    docs = rendered[f"{overlay}+{'+'.join(COMPONENTS)}"] + rendered[overlay]
    deployment = one(rendered[overlay], "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = one(rendered[overlay], "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8000, "http")]
    pdb = one(rendered[overlay], "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = one(rendered[overlay], "HorizontalPodAutoscaler")
    keda = one(docs, "ScaledObject")
    for target in (hpa["spec"]["scaleTargetRef"], keda["spec"]["scaleTargetRef"]):
        assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", deployment["metadata"]["name"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


# Target labels the Prometheus Operator gives every series a ServiceMonitor scrapes (its generated scrape config).
OPERATOR_TARGET_LABELS = {"job", "instance", "namespace", "service", "pod", "container", "endpoint"}


def test_the_service_monitor_keeps_the_services_own_labels(rendered: dict[str, list[Doc]]) -> None:
    """A series label that collides with a target label is renamed exported_<label> unless honorLabels:
    the rules and alerts select on the service's own names."""
    from service.metrics import Metrics

    own = {label for metric in vars(Metrics()).values() for label in getattr(metric, "_labelnames", ())}
    clashing = own & OPERATOR_TARGET_LABELS
    assert clashing == {"endpoint"}  # the request metrics' /v1/embeddings, /v1/classify
    monitor = one(rendered[f"cpu+{'+'.join(COMPONENTS)}"], "ServiceMonitor")
    assert all(endpoint.get("honorLabels") is True for endpoint in monitor["spec"]["endpoints"])


def test_network_policy_opens_port_8000_to_clients_and_the_scrape_only(rendered: dict[str, list[Doc]]) -> None:
    policy = one(rendered["cpu"], "NetworkPolicy")
    deployment = one(rendered["cpu"], "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"] and spec["egress"] == []
    sources = []
    for rule in spec["ingress"]:
        assert [(p["port"], p["protocol"]) for p in rule["ports"]] == [("http", "TCP")]
        (source,) = rule["from"]
        assert "namespaceSelector" in source, "every source is limited to chosen namespaces"
        sources.append(source)
    scrape = [s for s in sources if s.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/name":
                                                                                     "prometheus"}]
    assert scrape and scrape[0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}


def test_autoscaling_on_the_queue(rendered: dict[str, list[Doc]]) -> None:
    hpa = one(rendered["cpu"], "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    assert metric["pods"]["metric"]["name"] in SCALING_METRICS
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60
    assert hpa["spec"]["minReplicas"] >= 2, "a rolling update or a node drain keeps one pod serving"
    # prometheus-adapter serves that metric per pod
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "config.yaml").read_text())
    served = {rule["name"]["as"]: rule for rule in adapter["rules"]}
    rule = served[metric["pods"]["metric"]["name"]]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    # KEDA: the same metric, per pod, in the namespace the overlays deploy to
    keda = one(rendered["cpu+keda"], "ScaledObject")
    (trigger,) = keda["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger.get("metricType") == "AverageValue"
    query = trigger["metadata"]["query"]
    assert metric["pods"]["metric"]["name"] in query and 'namespace="metta"' in query and 'job="metta-serve"' in query
    assert keda["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["spec"]["behavior"]


def test_scaling_metrics_are_exported(dummy_server: ServerProcess) -> None:
    import httpx

    exported = exported_series_names(httpx.get(f"{dummy_server.url}/metrics", timeout=10).text)
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "config.yaml").read_text())
    names = {rule["name"]["as"] for rule in adapter["rules"]}
    assert names == SCALING_METRICS
    assert names <= exported, f"not exported by the service: {names - exported}"


# ---------------------------------------------------------------------------------------------- the bulk job

RAYJOB = K8S / "rayjob"


def test_the_rayjob_renders_and_validates_against_kuberays_crd(tmp_path: Path) -> None:
    result = kustomize(RAYJOB)
    assert result.returncode == 0, explain(result)
    docs = load_docs(result.stdout)
    assert sorted(doc["kind"] for doc in docs) == ["PersistentVolumeClaim", "RayJob"]
    for doc in docs:
        assert doc["metadata"]["namespace"] == "metta"
    core = [doc for doc in docs if doc["kind"] == "PersistentVolumeClaim"]
    validated = kubernetes_validate(core, tmp_path)
    assert validated.returncode == 0 and "passed" in validated.stdout, explain(validated)
    job = one(docs, "RayJob")
    assert crd_errors(job) == []


def test_the_rayjob_runs_the_documented_command_one_model_per_gpu() -> None:
    job = one(load_docs(kustomize(RAYJOB).stdout), "RayJob")
    spec = job["spec"]
    command = shlex.split(spec["entrypoint"])
    assert command[:2] == ["metta", "embed"] and "--ray" in command
    out = Path(command[command.index("--out") + 1])
    assert spec["shutdownAfterJobFinishes"] is True
    # the Ray of the image is the Ray that metta-serve[ray] pins
    pinned = [d for d in (REPO / "pyproject.toml").read_text().splitlines() if d.strip().startswith('ray = [')]
    assert pinned and f'=={spec["rayClusterSpec"]["rayVersion"]}"' in pinned[0]
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "no model actor on the head"
    (container,) = head["template"]["spec"]["containers"]
    # the driver commits the parts: the output's folder is a mounted volume on the head
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
    assert "persistentVolumeClaim" in volumes[mounts[str(out.parent)]]
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        (worker,) = group["template"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert worker["image"] == container["image"]
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        assert worker["securityContext"]["capabilities"]["drop"] == ["ALL"]
    env = env_of(container)
    assert all("secretKeyRef" in env[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))


@pytest.mark.parametrize(("index", "reason"), [(0, "'entrypointt' was unexpected"),
                                               (1, "'groupName' is a required property"),
                                               (2, "'four' is not of type 'integer'")])
def test_broken_rayjobs_fail_the_crd(index: int, reason: str) -> None:
    doc = load_docs((FIXTURES / "broken-rayjob.yaml").read_text())[index]
    errors = crd_errors(doc)
    assert any(reason in error for error in errors), errors
