"""Prometheus metrics and the HTTP server that also answers ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from worker.gpu import GpuCollector

log = logging.getLogger(__name__)

_BATCH_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_STAGE_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_E2E_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class WorkerMetrics:
    """Every metric of the worker, in its own registry so tests and benchmarks can run side by side."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "clip_worker_messages_consumed", "Records polled from the input topic", registry=r
        )
        self.embedded = Counter("clip_worker_images_embedded", "Images embedded by the model", registry=r)
        self.published = Counter(
            "clip_worker_records_published", "Output records acknowledged by the broker", registry=r
        )
        self.dlq = Counter(
            "clip_worker_dlq_records",
            "Records sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        self.commits = Counter("clip_worker_commits", "Successful offset commits", registry=r)
        self.commit_failures = Counter("clip_worker_commit_failures", "Failed offset commits", registry=r)
        self.publish_retries = Counter(
            "clip_worker_publish_retries", "Records re-sent after a failed delivery", registry=r
        )
        self.rebalances = Counter("clip_worker_rebalances", "Partition assignment changes", registry=r)
        self.device_decode_fallbacks = Counter(
            "clip_worker_device_decode_fallbacks",
            "--decode device: JPEGs the device refused, decoded on the host instead",
            registry=r,
        )
        self.transactions_aborted = Counter(
            "clip_worker_transactions_aborted",
            "Exactly-once mode: transactions aborted (and their records read again), by reason",
            ["reason"],
            registry=r,
        )
        self.batch_closes = Counter(
            "clip_worker_batch_closes",
            "Batches closed, by cause (size, timeout, drain)",
            ["cause"],
            registry=r,
        )
        self.batch_size = Histogram(
            "clip_worker_batch_size_images",
            "Images per inference batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.stage_seconds = Histogram(
            "clip_worker_stage_seconds",
            "Seconds per stage: decode and queue_wait per image; device_decode, inference, publish per batch",
            ["stage"],
            buckets=_STAGE_SECONDS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "clip_worker_end_to_end_seconds",
            "Record timestamp to broker acknowledgement of its embedding",
            buckets=_E2E_SECONDS,
            registry=r,
        )
        self.in_flight_images = Gauge(
            "clip_worker_in_flight_images", "Records polled and not yet acknowledged", registry=r
        )
        self.in_flight_bytes = Gauge(
            "clip_worker_in_flight_bytes", "Value bytes of the records counted as in flight", registry=r
        )
        self.assigned_partitions = Gauge(
            "clip_worker_assigned_partitions", "Input partitions owned by this worker", registry=r
        )
        self.paused_partitions = Gauge(
            "clip_worker_paused_partitions", "Input partitions paused for backpressure", registry=r
        )
        self.lag = Gauge(
            "clip_worker_consumer_lag_records",
            "High watermark minus consumer position, per assigned partition",
            ["topic", "partition"],
            registry=r,
        )
        self.last_progress = Gauge(
            "clip_worker_last_progress_timestamp_seconds", "Unix time the loop last made progress", registry=r
        )
        self.gpu: GpuCollector | None = None
        if torch.cuda.is_available():
            self.gpu = GpuCollector()
            r.register(self.gpu)
        self.info = Info("clip_worker_model", "Model, revision, dtype, device and version", registry=r)


class HealthState:
    """What the health endpoints report: liveness (recent loop progress) and readiness."""

    def __init__(self, stall_after_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._stall_after_s = stall_after_s
        self._last_beat = clock()
        self.model_loaded = False
        self.in_group = False

    def beat(self) -> None:
        """The main loop completed an iteration."""
        self._last_beat = self._clock()

    def alive(self) -> bool:
        """The loop made progress within ``stall_after_s``."""
        return self._clock() - self._last_beat < self._stall_after_s

    def ready(self) -> bool:
        """The model is loaded and the consumer holds a group assignment."""
        return self.model_loaded and self.in_group


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on one port from a daemon thread."""

    def __init__(self, host: str, port: int, metrics: WorkerMetrics, health: HealthState) -> None:
        handler = _make_handler(metrics, health)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        """Start serving."""
        self._thread.start()
        log.info("metrics and health on port %d (/metrics /healthz /readyz)", self.port)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()


def _make_handler(metrics: WorkerMetrics, health: HealthState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = health.alive()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"stalled\n")
            elif path == "/readyz":
                ok = health.ready()
                self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._reply(404, b"not found\n")

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler
