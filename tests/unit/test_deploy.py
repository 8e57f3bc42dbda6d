"""Static checks of deploy/: compose, Dockerfile, app configs, Kubernetes,
Prometheus and Grafana files, all offline."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from muxgate.gateway._config import AppConfig, load_config, parse_config
from muxgate.gateway._metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_REPLICAS = DEPLOY / "k8s-replicas"
#: Kubernetes version the manifests are validated against (kubernetes-validate ships its schema).
K8S_VERSION = "1.33.0"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package `prometheus`; `make system-deps` installs it)",
)


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


# -- compose -------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(DEPLOY / "compose.yaml")
    assert isinstance(data, dict)
    return data


def test_compose_references_existing_files(compose: dict[str, Any]) -> None:
    services = compose["services"]
    named_volumes = set(compose.get("volumes") or {})
    assert {"gateway", "minio", "jaeger", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = (DEPLOY / build["context"]).resolve()
            assert context.is_dir(), name
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named_volumes, f"{name} uses undeclared volume {source}"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_wires_the_gateway_to_its_config_and_telemetry(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    assert "./app.yaml:/app/app.yaml:ro" in gateway["volumes"]
    config = load_config(DEPLOY / "app.yaml")
    assert config.tracing.exporter == "otlp"
    assert config.tracing.endpoint == "http://jaeger:4318"
    assert config.storage["s3"]["endpoint_url"] == "http://minio:9000"
    assert config.deployments[0].init_kwargs["model_root"].startswith("s3://")
    # Prometheus scrapes the gateway with the admin token the gateway expects.
    prometheus = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "muxgate")
    assert job["metrics_path"] == "/-/metrics"
    assert job["authorization"]["credentials"] == config.http.admin_token
    assert job["static_configs"][0]["targets"] == [f"gateway:{config.http.port}"]
    # Grafana's provisioning and dashboards are mounted where the provider looks.
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/muxgate.yml")
    path = provider["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]


# -- image ---------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_shape_and_copied_paths_exist() -> None:
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [rest for op, rest in steps if op == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    project_step = next(i for i, r in enumerate(runs) if re.search(r"pip install \.", r))
    assert torch_step < project_step, "torch (CPU) must be installed before the project"
    assert "download.pytorch.org/whl/cpu" in runs[torch_step]
    users = [rest for op, rest in steps if op == "USER"]
    assert users and not users[-1].startswith(("0", "root"))
    assert steps[-1] == ("CMD", '["serve", "/app/app.yaml"]')
    assert ("ENTRYPOINT", '["muxgate"]') in steps
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for op, rest in steps:
        if op == "COPY":
            *sources, _ = [a for a in rest.split() if not a.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert f"!{source}" in ignore, f"{source} is excluded from the build context"


# -- app configs ---------------------------------------------------------------


def configmap_app() -> AppConfig:
    configmap = load_yaml(K8S / "configmap.yaml")
    return parse_config(
        yaml.safe_load(configmap["data"]["app.yaml"]),
        source="configmap.yaml",
        base_dir="/etc/muxgate",
    )


def test_app_configs_pass_gateway_validation_and_resolve_in_the_image() -> None:
    for config, app_dir in ((load_config(DEPLOY / "app.yaml"), DEPLOY), (configmap_app(), None)):
        if app_dir is None:
            assert config.app_dir == "/app"  # where the image puts examples/
        assert config.http.host == "0.0.0.0"  # inside a container or pod
        for d in config.deployments:
            module, _, _ = d.import_path.partition(":")
            # The image copies examples/ to /app/examples; check against the repo.
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), d.import_path


# -- Kubernetes ----------------------------------------------------------------


def k8s_documents(folder: Path = K8S) -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        with path.open() as f:
            docs.extend((path.name, d) for d in yaml.safe_load_all(f) if d)
    return docs


@pytest.mark.parametrize(
    ("name", "doc"), k8s_documents() + k8s_documents(K8S_REPLICAS), ids=lambda v: str(v)[:40]
)
def test_k8s_manifest_validates(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert doc["metadata"].get("namespace", "muxgate") == "muxgate" or doc["kind"] == "Namespace"


@pytest.mark.parametrize("folder", [K8S, K8S_REPLICAS], ids=lambda p: p.name)
def test_kustomization_lists_every_manifest(folder: Path) -> None:
    kustomization = load_yaml(folder / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_replica_pods_fit_the_gateway_manifests() -> None:
    by_kind = {doc["kind"]: doc for _, doc in k8s_documents(K8S_REPLICAS)}
    statefulset, service = by_kind["StatefulSet"], by_kind["Service"]
    pod = statefulset["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # headless, named by the StatefulSet: one DNS name for the ready pods
    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    assert args[:2] == ["replica", "/etc/muxgate/app.yaml"]
    option = {args[i]: args[i + 1] for i in range(2, len(args), 2)}
    assert option["--deployment"] in {d.name for d in configmap_app().deployments}
    assert option["--name"] == "$(POD_NAME)"
    port = int(option["--listen"].rpartition(":")[2])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert service["spec"]["ports"][0]["port"] == port
    # the same app config as the gateway's; the secret is required here
    # (a non-loopback listener), optional on the gateway
    assert pod["spec"]["volumes"][0]["configMap"]["name"] == "muxgate-app"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    secret_ref = env["MUXGATE_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"]
    assert "optional" not in secret_ref
    gateway = next(d for _, d in k8s_documents() if d["kind"] == "Deployment")
    (gateway_container,) = gateway["spec"]["template"]["spec"]["containers"]
    gateway_env = {e["name"]: e for e in gateway_container["env"]}
    gateway_ref = gateway_env["MUXGATE_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"]
    assert (gateway_ref["name"], gateway_ref["key"], gateway_ref["optional"]) == (
        secret_ref["name"],
        secret_ref["key"],
        True,
    )
    # gracefully stopped replicas get longer than a request may take
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > configmap_app().http.request_timeout_s


def test_k8s_objects_fit_together() -> None:
    by_kind = {doc["kind"]: doc for _, doc in k8s_documents()}
    deployment, service = by_kind["Deployment"], by_kind["Service"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
        labels.items()
    )
    assert (
        by_kind["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"]
        == (deployment["metadata"]["name"])
    )
    (container,) = pod["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in port_names
    assert {p["containerPort"] for p in container["ports"]} == {configmap_app().http.port}
    # the mounted ConfigMap exists and the gateway is pointed at its key
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    configmap_name = volumes["config"]["configMap"]["name"]
    assert configmap_name == by_kind["ConfigMap"]["metadata"]["name"]
    assert container["args"] == ["serve", f"{mounts['config']}/app.yaml"]
    # restricted pod security: non-root, no escalation, no capabilities, RO root
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["limits"]["memory"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/healthz"
    assert "livenessProbe" in container


# -- Prometheus ----------------------------------------------------------------


@needs_promtool
@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ],
    ids=lambda a: " ".join(a),
)
def test_promtool_accepts(args: list[str]) -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, *args],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- metric names used by dashboards and alerts -----------------------------------


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Sample name -> label names, as a GatewayMetrics with data renders them."""
    m = GatewayMetrics()
    m.observe_request("Model", 200, 0.01)
    m.observe_request("Model", 503, 0.5)
    m.set_queue_length("Model", 1)
    m.set_replicas("Model", {"running": 1, "starting": 1, "draining": 0})
    m.count_spillover("Model")
    m.set_replica_counters(
        "Model",
        "Model#a",
        {
            "model_loads": 1,
            "model_load_failures": 1,
            "model_unloads_lru": 1,
            "model_unloads_shutdown": 0,
            "model_unloads_drain": 0,
            "cache_hits": 1,
            "cache_misses": 1,
            "model_load_seconds_sum": 0.5,
            "models_loaded": 1,
        },
    )
    body, _ = m.render()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    # labels every scraped series gets from Prometheus itself
    return {name: labels | {"job", "instance", "service"} for name, labels in out.items()}


_SELECTOR = re.compile(r"\b(muxgate_[a-z0-9_]+)(?:\{([^}]*)\})?")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/muxgate.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    return exprs


def alert_exprs() -> list[str]:
    rules = load_yaml(DEPLOY / "prometheus/alerts.yml")
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queried_metrics_and_labels_exist(source: str, exported: dict[str, set[str]]) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    used = 0
    for expr in exprs:
        for name, matchers in _SELECTOR.findall(expr):
            used += 1
            assert name in exported, f"{source} queries {name}, which the gateway does not export"
            for label in _MATCHER.findall(matchers):
                assert label in exported[name], f"{source}: {name} has no label {label!r}"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                assert any(label in labels for labels in exported.values()), label
    assert used >= 5


def test_grafana_dashboard_and_datasources() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/muxgate.json").read_text())
    datasources = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    uids = {d["uid"] for d in datasources["datasources"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids
        assert panel["targets"], panel["title"]
        assert panel["gridPos"]["x"] >= 0 and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "latency", "hit ratio", "loads", "replicas by state", "queue"):
        assert topic in titles
    exprs = " ".join(dashboard_exprs())
    assert "histogram_quantile(0.99" in exprs
