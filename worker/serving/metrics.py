"""What the embeddings API reports, in the worker's registry: beside it the worker's own batch, stage, model
and GPU metrics, which the shared inference stage fills as it does in the worker."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_REQUEST_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServeMetrics:
    """Requests by endpoint and status, their latency, and the queue's depth."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "clip_worker_serve_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "clip_worker_serve_request_seconds",
            "Seconds from a request's arrival to its answer, by endpoint",
            ["endpoint"],
            buckets=_REQUEST_SECONDS,
            registry=registry,
        )
        self.queued = Gauge(
            "clip_worker_serve_queued_inputs",
            "Inputs admitted and not yet answered (--serve-max-queue bounds them)",
            registry=registry,
        )
        self.refused = Counter(
            "clip_worker_serve_refused_inputs",
            "Inputs of requests refused because the queue was full (answered 429)",
            registry=registry,
        )
