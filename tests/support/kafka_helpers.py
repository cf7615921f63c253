"""Helpers for integration tests: unique names, producing requests, collecting results, running workers."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from worker.config import Settings, load_settings
from worker.inference.embedder import Embedder
from worker.kafka_io import ensure_topics
from worker.loop.service import run_worker
from worker.messages import REASON_HEADER, decode_embedding, encode_request
from worker.ops.health import HealthState
from worker.ops.metrics import WorkerMetrics

KAFKA_CLIENTS = pytest.mark.parametrize("kafka_client", ["kafka-python", "librdkafka"])
"""Runs a test once per Kafka client the worker can use (``--kafka-client``)."""


def unique(prefix: str) -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def worker_settings(bootstrap: str, tag: str | None = None, **overrides: Any) -> Settings:
    """Settings for a test worker on fresh topics and group."""
    tag = tag or unique("t")
    values: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "input_topic": f"{tag}.images",
        "output_topic": f"{tag}.embeddings",
        "dlq_topic": f"{tag}.dlq",
        "group_id": f"{tag}.group",
        "batch_size": 8,
        "batch_timeout_ms": 100,
        "metrics_port": 0,
        "session_timeout_ms": 6000,
        "metadata_max_age_ms": 3000,
        "commit_interval_ms": 200,
        "connect_timeout_s": 20,
        "shutdown_grace_s": 20,
        "device": "cpu",
    }
    values.update(overrides)
    return load_settings(values, environ={})


def create_topics(settings: Settings, partitions: int = 1) -> None:
    """Input, output and DLQ topics of a test (and the NSFW topic when it routes)."""
    ensure_topics(settings, {settings.input_topic: partitions, **{t: 1 for _, t in settings.output_topics()}})


def produce(
    settings: Settings, items: list[tuple[str, bytes]], keyed: bool = True, partition: int | None = None
) -> None:
    """Publish ``(id, image bytes)`` requests; raw values when the id starts with ``raw:``."""
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, max_request_size=32 * 1024 * 1024)
    for request_id, data in items:
        value = data if request_id.startswith("raw:") else encode_request(request_id, data, {"n": request_id})
        key = request_id.encode() if keyed else None
        producer.send(settings.input_topic, key=key, value=value, partition=partition)
    producer.flush()
    producer.close()


@dataclass
class SteadyProducer:
    """The thread of :func:`produce_steadily` and what went wrong in it."""

    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    def join(self, timeout: float) -> None:
        """Wait until every request is acknowledged; fail the test if one was not."""
        self.thread.join(timeout=timeout)
        assert not self.thread.is_alive(), f"the test's producer was still sending after {timeout:.0f}s"
        assert not self.errors, f"the test's producer failed: {self.errors[0]!r}"


def produce_steadily(settings: Settings, items: list[tuple[str, bytes]], seconds: float) -> SteadyProducer:
    """Publish requests spread over ``seconds`` from a thread, so a fault test always has work in flight.

    One idempotent producer: records sent while the broker is away wait in its buffer and are delivered,
    once each, when it is back.
    """
    slices = max(1, int(seconds * 10))
    size = -(-len(items) // slices)
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        max_request_size=32 * 1024 * 1024,
        enable_idempotence=True,
        delivery_timeout_ms=180_000,
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            futures = []
            for start in range(0, len(items), size):
                for request_id, data in items[start : start + size]:
                    value = encode_request(request_id, data, {"n": request_id})
                    futures.append(producer.send(settings.input_topic, key=request_id.encode(), value=value))
                time.sleep(0.1)
            producer.flush(timeout=180)
            for future in futures:
                future.get(timeout=1)
        except BaseException as exc:
            errors.append(exc)
        finally:
            producer.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return SteadyProducer(thread, errors)


@dataclass
class Results:
    """Everything read back from the output, NSFW (with ``--route-nsfw-above``) and DLQ topics."""

    outputs: list[dict[str, Any]] = field(default_factory=list)
    raw_outputs: list[bytes] = field(default_factory=list)
    output_keys: list[bytes | None] = field(default_factory=list)
    dead: list[Any] = field(default_factory=list)
    routed: list[dict[str, Any]] = field(default_factory=list)
    raw_routed: list[bytes] = field(default_factory=list)

    def dlq_keys(self) -> list[str]:
        """Keys of dead-lettered records (the request ids in these tests)."""
        return [m.key.decode() if m.key is not None else "" for m in self.dead]

    def reasons(self) -> dict[str, str]:
        """Dead-lettered key -> reason header."""
        return {(m.key.decode() if m.key else ""): dict(m.headers)[REASON_HEADER].decode() for m in self.dead}

    def total(self) -> int:
        """Outputs (routed ones included) plus dead letters."""
        return len(self.outputs) + len(self.routed) + len(self.dead)


def collect(
    settings: Settings,
    expected: int,
    timeout_s: float = 60.0,
    settle_s: float = 0.0,
    read_committed: bool = False,
) -> Results:
    """Read the topics the worker writes to from the start until ``expected`` records (then ``settle_s``
    more)."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=32 * 1024 * 1024,
        isolation_level="read_committed" if read_committed else "read_uncommitted",
    )
    consumer.subscribe([topic for _, topic in settings.output_topics()])
    results = Results()
    deadline = time.monotonic() + timeout_s
    settle_until: float | None = None
    try:
        while time.monotonic() < deadline:
            for messages in consumer.poll(timeout_ms=200).values():
                for message in messages:
                    if message.topic == settings.output_topic:
                        results.outputs.append(decode_embedding(message.value))
                        results.raw_outputs.append(message.value)
                        results.output_keys.append(message.key)
                    elif message.topic == settings.nsfw_output_topic:
                        results.routed.append(decode_embedding(message.value))
                        results.raw_routed.append(message.value)
                    else:
                        results.dead.append(message)
            if results.total() >= expected:
                settle_until = settle_until or time.monotonic() + settle_s
                if time.monotonic() >= settle_until:
                    break
    finally:
        consumer.close()
    return results


def committed_offsets(settings: Settings, partitions: int) -> dict[int, int | None]:
    """The group's committed offset per input partition."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=settings.group_id, enable_auto_commit=False
    )
    try:
        return {p: consumer.committed(TopicPartition(settings.input_topic, p)) for p in range(partitions)}
    finally:
        consumer.close()


@dataclass
class RunningWorker:
    """A worker running in a thread of the test process."""

    settings: Settings
    stop: threading.Event
    thread: threading.Thread
    metrics: WorkerMetrics
    exit_codes: list[int]
    health: HealthState

    def shutdown(self, timeout_s: float = 30.0) -> int:
        """Ask for a graceful stop and wait; returns the exit code."""
        self.stop.set()
        self.thread.join(timeout=timeout_s)
        assert not self.thread.is_alive(), "worker did not stop within the timeout"
        return self.exit_codes[0]


def start_worker(settings: Settings, embedder: Embedder) -> RunningWorker:
    """Start a worker thread with a pre-loaded model."""
    stop = threading.Event()
    metrics = WorkerMetrics()
    health = HealthState()
    exit_codes: list[int] = []
    thread = threading.Thread(
        target=lambda: exit_codes.append(run_worker(settings, stop, embedder, metrics, health)),
        daemon=True,
    )
    thread.start()
    return RunningWorker(settings, stop, thread, metrics, exit_codes, health)


@contextlib.contextmanager
def running_worker(settings: Settings, embedder: Embedder) -> Iterator[RunningWorker]:
    """A worker for the duration of a ``with`` block; it must stop cleanly."""
    worker = start_worker(settings, embedder)
    try:
        yield worker
    finally:
        if worker.thread.is_alive():
            assert worker.shutdown() == 0


def wait_until(condition: Any, timeout_s: float, message: str | Callable[[], str]) -> None:
    """Poll ``condition()`` until true; after ``timeout_s`` fail with ``message`` (called if callable)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(message() if callable(message) else message)


CLI = [sys.executable, "-m", "worker.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without CLIP_WORKER_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_WORKER_")}
    env.update(extra)
    return env


def topic_flags(settings: Settings, bootstrap: str | None = None) -> list[str]:
    """``clip-worker run`` flags naming the broker, the three topics and the group of ``settings``."""
    return [
        "--bootstrap-servers", bootstrap or settings.bootstrap_servers,
        "--input-topic", settings.input_topic,
        "--output-topic", settings.output_topic,
        "--dlq-topic", settings.dlq_topic,
        "--group-id", settings.group_id,
    ]  # fmt: skip
