"""What fetching reports, and to what: the worker's metrics (:class:`worker.ops.metrics.WorkerMetrics`)
have these, and so may any stand-in."""

from __future__ import annotations

from typing import Protocol

from prometheus_client import Counter, Histogram


class FetchMetrics(Protocol):
    """Fetches by scheme and outcome (``ok`` or the rejection's reason), their seconds, the bytes they
    brought, and the retries they took."""

    fetches: Counter
    fetch_seconds: Histogram
    fetched_bytes: Counter
    fetch_retries: Counter
