"""Prometheus metrics and the HTTP server that also answers ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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

from worker.errors import StartupError
from worker.gpu import GpuCollector
from worker.messages import Modality

log = logging.getLogger(__name__)

_BATCH_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_STAGE_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_FETCH_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
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
        self.nsfw_routed = Counter(
            "clip_worker_nsfw_routed",
            "Output records acknowledged on the NSFW topic (--route-nsfw-above); also counted as published",
            registry=r,
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
        self.publish_failures = Counter(
            "clip_worker_publish_failures",
            "Failed deliveries (each is retried, or aborts the transaction), by topic and error",
            ["topic", "error"],
            registry=r,
        )
        self.undeliverable = Counter(
            "clip_worker_undeliverable_records",
            "Dead letters the DLQ topic cannot take even cut down, skipped with an error log line",
            registry=r,
        )
        self.unreadable_records = Counter(
            "clip_worker_unreadable_records",
            "Input records the Kafka client could not parse, dead-lettered as far as they were read",
            registry=r,
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
            "Seconds per stage: decode and queue_wait per image; device_decode, inference, publish per "
            "batch; for texts (--texts): tokenize per chunk, text_queue_wait per text, text_inference and "
            "text_publish per batch",
            ["stage"],
            buckets=_STAGE_SECONDS,
            registry=r,
        )
        self.fetches = Counter(
            "clip_worker_fetches",
            "Images fetched by reference, by scheme and outcome (ok or the dead-letter reason)",
            ["scheme", "outcome"],
            registry=r,
        )
        self.fetch_retries = Counter(
            "clip_worker_fetch_retries",
            "Fetch tries repeated after a retriable failure, by scheme",
            ["scheme"],
            registry=r,
        )
        self.fetch_seconds = Histogram(
            "clip_worker_fetch_seconds",
            "Seconds to fetch an image by reference, retries included, by scheme",
            ["scheme"],
            buckets=_FETCH_SECONDS,
            registry=r,
        )
        self.fetched_bytes = Counter(
            "clip_worker_fetched_bytes", "Image bytes fetched by reference, by scheme", ["scheme"], registry=r
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
        self.stalled_seconds = Gauge(
            "clip_worker_stalled_seconds",
            "Seconds since the last acknowledged result while records are in flight (0 when idle)",
            registry=r,
        )
        self.last_progress = Gauge(
            "clip_worker_last_progress_timestamp_seconds", "Unix time the loop last made progress", registry=r
        )
        self.texts_embedded = Counter(
            "clip_worker_texts_embedded", "Texts embedded by the model's text tower (--texts)", registry=r
        )
        self.text_batch_closes = Counter(
            "clip_worker_text_batch_closes",
            "Batches of texts closed, by cause (size, timeout, drain)",
            ["cause"],
            registry=r,
        )
        self.text_batch_size = Histogram(
            "clip_worker_batch_size_texts",
            "Texts per inference batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self._by_modality = {
            Modality.IMAGE: BatchMetrics(
                self.embedded, self.batch_closes, self.batch_size, self.stage_seconds
            ),
            Modality.TEXT: BatchMetrics(
                self.texts_embedded, self.text_batch_closes, self.text_batch_size, self.stage_seconds, "text_"
            ),
        }
        self.gpu: GpuCollector | None = None
        if torch.cuda.is_available():
            self.gpu = GpuCollector()
            r.register(self.gpu)
        self.info = Info("clip_worker_model", "Model, revision, dtype, device and version", registry=r)

    def of(self, modality: Modality) -> BatchMetrics:
        """The batch metrics of images or of texts: each its own series, so image counts stay images."""
        return self._by_modality[modality]


@dataclass(frozen=True)
class BatchMetrics:
    """The metrics of one modality's batches: images' are the original names, texts' their twins."""

    embedded: Counter
    closes: Counter
    size: Histogram
    _stages: Histogram
    stage_prefix: str = ""

    def stage(self, name: str) -> Any:
        """The stage histogram of ``name`` (``inference``, ``queue_wait``, ``publish``) for this modality:
        texts' stages are ``text_<name>``."""
        return self._stages.labels(self.stage_prefix + name)


HealthCheck = Callable[[], str | None]


class HealthState:
    """What the health endpoints report.

    Liveness: the main loop made progress recently and every registered liveness check passes (the
    pipeline moves, its threads are alive). Readiness: the model is loaded, the consumer holds a group
    assignment and every registered readiness check passes (the topics exist, deliveries succeed). A check
    returns None when all is well, else a one-line reason that the endpoint answers with.
    """

    def __init__(self, stall_after_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._stall_after_s = stall_after_s
        self._last_beat = clock()
        self.model_loaded = False
        self.in_group = False
        self._liveness: list[HealthCheck] = []
        self._readiness: list[HealthCheck] = []

    def beat(self) -> None:
        """The main loop completed an iteration."""
        self._last_beat = self._clock()

    def add_liveness_check(self, check: HealthCheck) -> None:
        """A check whose failure means the worker cannot recover by itself (restart it)."""
        self._liveness.append(check)

    def add_readiness_check(self, check: HealthCheck) -> None:
        """A check whose failure means the worker cannot do its job right now."""
        self._readiness.append(check)

    def liveness_problem(self) -> str | None:
        """Why the worker is not alive, or None."""
        stalled = self._clock() - self._last_beat
        if stalled >= self._stall_after_s:
            return f"the main loop has not run for {stalled:.0f}s"
        return _first_problem(self._liveness)

    def readiness_problem(self) -> str | None:
        """Why the worker is not ready, or None."""
        if not self.model_loaded:
            return "the model is not loaded yet"
        problem = _first_problem(self._readiness)
        if problem is None and not self.in_group:
            return "no partition assignment from the consumer group yet"
        return problem


def _first_problem(checks: list[HealthCheck]) -> str | None:
    for check in checks:
        problem = check()
        if problem is not None:
            return problem
    return None


# Scrapers and probes need a handful of connections; beyond this, new ones are closed at once, and an idle
# connection is dropped after the timeout, so no client can pin threads.
MAX_CONNECTIONS = 16
CONNECTION_TIMEOUT_S = 10.0


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most :data:`MAX_CONNECTIONS` at once; errors go to the log."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("metrics server: %d connections open; refusing one more", MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-reply (a probe timing out) is routine: one debug line, no traceback.
        log.debug("metrics server: connection from %s ended early", client_address, exc_info=True)


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on one port from a daemon thread.

    Raises :class:`worker.errors.StartupError` when the address cannot be bound.
    """

    def __init__(self, host: str, port: int, metrics: WorkerMetrics, health: HealthState) -> None:
        handler = _make_handler(metrics, health)
        try:
            self._server = _BoundedHTTPServer((host, port), handler)
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); "
                "free the port or choose another with --metrics-port / --metrics-host (0 disables)"
            ) from None
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
        timeout = CONNECTION_TIMEOUT_S

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                problem = health.liveness_problem()
                body = b"ok\n" if problem is None else f"stalled: {problem}\n".encode()
                self._reply(200 if problem is None else 503, body)
            elif path == "/readyz":
                problem = health.readiness_problem()
                body = b"ready\n" if problem is None else f"not ready: {problem}\n".encode()
                self._reply(200 if problem is None else 503, body)
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
