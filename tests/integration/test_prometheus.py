"""A real Prometheus scrapes the worker during a round trip; every dashboard and alert query runs on it."""

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.bad_inputs import bad_requests
from tests.support.kafka_helpers import (
    collect,
    create_topics,
    produce,
    running_worker,
    wait_until,
    worker_settings,
)
from tests.support.tools import require_tool
from worker.devtools.brokers import free_port, wait_for_port
from worker.devtools.samples import jpeg_corpus

pytestmark = pytest.mark.integration
DOCKER = Path(__file__).resolve().parents[2] / "docker"


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expression: str) -> list[dict[str, Any]]:
        with urllib.request.urlopen(
            f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression}), timeout=10
        ) as response:
            body = json.load(response)
        assert body["status"] == "success", (expression, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expression: str) -> float | None:
        result = self.query(expression)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    binary = require_tool("prometheus", "apt-get install prometheus")
    processes: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> Prometheus:
        port = free_port()
        rules = tmp_path / "alerts.yml"
        rules.write_text((DOCKER / "prometheus" / "alerts.yml").read_text())
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules)],
                    "scrape_configs": [
                        {
                            "job_name": "clip-worker",
                            "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                        }
                    ],
                }
            )
        )
        log = (tmp_path / "prometheus.log").open("wb")
        processes.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        wait_for_port("127.0.0.1", port, 30, processes[-1])
        return Prometheus(f"http://127.0.0.1:{port}")

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=20)


def dashboard_and_alert_expressions() -> list[str]:
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "clip-worker.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())
    expressions += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return [e.replace("$__rate_interval", "1m") for e in expressions]


def test_prometheus_scrapes_throughput_lag_and_dead_letters(kafka_bootstrap, tiny_embedder, prometheus_for):
    metrics_port = free_port()
    settings = worker_settings(
        kafka_bootstrap, metrics_port=metrics_port, metrics_host="127.0.0.1", batch_size=8, max_in_flight=64
    )
    create_topics(settings, partitions=2)
    prometheus = prometheus_for(metrics_port)
    good = [(f"p-{i:04d}.jpg", data) for i, data in enumerate(jpeg_corpus(240, 320, 240))]
    bad = bad_requests()

    with running_worker(settings, tiny_embedder):
        # Two scrapes of the idle worker first, so rates have a baseline sample before the images arrive.
        wait_until(
            lambda: (prometheus.value('count_over_time(up{job="clip-worker"}[1m])') or 0) >= 2,
            60,
            "Prometheus never scraped the worker twice",
        )
        produce(settings, good + [(key, value) for key, value, _ in bad])
        results = collect(settings, expected=len(good) + len(bad), timeout_s=120)
        assert results.total() == len(good) + len(bad)
        # >=: at-least-once allows a re-published image after a rebalance; each id is checked by collect().
        wait_until(
            lambda: (prometheus.value("sum(clip_worker_records_published_total)") or 0) >= len(good),
            30,
            lambda: (
                f"Prometheus saw {prometheus.query('sum(clip_worker_records_published_total)')} publishes"
            ),
        )
        wait_until(
            lambda: prometheus.value("sum(clip_worker_consumer_lag_records)") == 0.0,
            30,
            lambda: f"lag never reached 0: {prometheus.query('clip_worker_consumer_lag_records')}",
        )
        embedded_rate = prometheus.value("sum(rate(clip_worker_images_embedded_total[1m]))")
        assert embedded_rate is not None and embedded_rate > 0
        dead = {
            r["metric"]["reason"]: float(r["value"][1])
            for r in prometheus.query("sum by (reason) (clip_worker_dlq_records_total)")
        }
        assert dead == {k: float(v) for k, v in Counter(reason.value for _, _, reason in bad).items()}
        for expression in dashboard_and_alert_expressions():
            prometheus.query(expression)  # raises on a query Prometheus cannot evaluate

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            exposition = response.read()
    promtool = require_tool("promtool", "apt-get install prometheus")
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30, check=False
    )
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


def test_health_endpoints_report_readiness_and_liveness(kafka_bootstrap, tiny_embedder):
    port = free_port()
    settings = worker_settings(kafka_bootstrap, metrics_port=port, metrics_host="127.0.0.1")
    create_topics(settings)

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except urllib.error.URLError:
            return 0

    with running_worker(settings, tiny_embedder):
        wait_until(lambda: status("/readyz") == 200, 30, "never ready")
        assert status("/healthz") == 200
        assert status("/nope") == 404
    started = time.monotonic()
    wait_until(lambda: status("/healthz") == 0, 10, "metrics server still up after shutdown")
    assert time.monotonic() - started < 10
