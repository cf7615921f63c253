"""The worker's Prometheus metrics: one registry, every counter, gauge and histogram the worker and its
stages report to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from worker.messages import Modality
from worker.ops.gpu import GpuCollector

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
