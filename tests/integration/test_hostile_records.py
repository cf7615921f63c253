"""Records and situations that once stopped a partition for good or stalled the worker silently.

Each case runs against the real broker; where the delivery mode matters, in both modes. After the hostile
record, ordinary images follow on the same partition: the worker must handle the hostile one once and for
all (an output, a dead letter, or a counted skip) and move on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from kafka import KafkaAdminClient, KafkaProducer
from kafka.record.default_records import DefaultRecordBatchBuilder

from tests.support.kafka_helpers import (
    KAFKA_CLIENTS,
    collect,
    committed_offsets,
    create_topics,
    running_worker,
    start_worker,
    wait_until,
    worker_settings,
)
from worker.config import Settings
from worker.devtools.samples import jpeg_corpus
from worker.errors import ExitCode
from worker.inference.embedder import Embedder, PendingEmbeddings
from worker.kafka_io import ensure_topics
from worker.messages import (
    KEY_TRUNCATED_HEADER,
    NULL_VALUE_HEADER,
    REASON_HEADER,
    VALUE_OMITTED_HEADER,
    encode_request,
)
from worker.models.heads import ScoreHeads

pytestmark = pytest.mark.integration
MODES = pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])


class NotUtf8(str):
    """A header name whose UTF-8 form is not UTF-8: how another client can write a name kafka-python
    cannot read back."""

    def encode(self, *_args: Any, **_kwargs: Any) -> bytes:
        return b"\xff\xfe-bad"


NULL_HEADER = b"\x00null-header\x00"  # written as a null header value (see null_header_values)


@pytest.fixture
def null_header_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the test's producer write null header values, as other clients do (kafka-python's refuses)."""
    original = DefaultRecordBatchBuilder.append

    def append(self: Any, offset: int, timestamp: int, key: Any, value: Any, headers: Any) -> Any:
        headers = [(name, None if data == NULL_HEADER else data) for name, data in headers]
        return original(self, offset, timestamp, key, value, headers)

    monkeypatch.setattr(DefaultRecordBatchBuilder, "append", append)


NULL = b"\x00null-record\x00"  # sent as a null value (kafka-python refuses a null key and value as given)


def send_raw(settings: Settings, records: list[dict[str, Any]]) -> None:
    """Publish records exactly as given (key, value, headers) to the input topic's partition 0."""
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        max_request_size=8 * 1024 * 1024,
        value_serializer=lambda value: None if value == NULL else value,
    )
    for record in records:
        producer.send(settings.input_topic, partition=0, **record)
    producer.flush()
    producer.close()


def images(count: int, prefix: str = "ok") -> list[dict[str, Any]]:
    return [
        {"key": f"{prefix}-{i}".encode(), "value": encode_request(f"{prefix}-{i}", data)}
        for i, data in enumerate(jpeg_corpus(count, 96, 64))
    ]


def run_until_done(settings: Settings, embedder: Embedder, expected: int, exactly_once: bool) -> Any:
    """Run a worker until ``expected`` results are read back and every offset is committed."""
    with running_worker(settings, embedder) as worker:
        results = collect(
            settings, expected=expected, timeout_s=60, settle_s=0.5, read_committed=exactly_once
        )
        wait_until(
            lambda: committed_offsets(settings, 1)[0] == expected,
            30,
            lambda: f"committed {committed_offsets(settings, 1)}, expected {expected}",
        )
    return results, worker


@MODES
@KAFKA_CLIENTS
@pytest.mark.usefixtures("null_header_values")
def test_null_key_and_value_and_null_header_values_are_handled(
    kafka_bootstrap, tiny_embedder, exactly_once, kafka_client
):
    settings = worker_settings(kafka_bootstrap, exactly_once=exactly_once, kafka_client=kafka_client)
    create_topics(settings)
    ok = images(3)
    good_with_null_header = {**ok[1], "headers": [("trace", NULL_HEADER), ("kept", b"yes")]}
    bad_with_null_header = {"key": b"bad", "value": b"\xc1 not msgpack", "headers": [("trace", NULL_HEADER)]}
    send_raw(
        settings, [ok[0], {"key": None, "value": NULL}, good_with_null_header, bad_with_null_header, ok[2]]
    )
    results, _ = run_until_done(settings, tiny_embedder, 5, exactly_once)
    assert sorted(r["id"] for r in results.outputs) == ["ok-0", "ok-1", "ok-2"]
    by_key = {m.key: m for m in results.dead}
    tombstone = by_key[None]
    assert tombstone.value == b"" and dict(tombstone.headers)[NULL_VALUE_HEADER] == b"true"
    assert dict(by_key[b"bad"].headers)[REASON_HEADER] == b"invalid_msgpack"
    assert dict(by_key[b"bad"].headers)["trace"] == b"", "a null header value travels as empty bytes"


@MODES
def test_keyless_dead_letter_too_large_for_the_dlq_goes_without_its_value(
    kafka_bootstrap, tiny_embedder, exactly_once
):
    settings = worker_settings(kafka_bootstrap, exactly_once=exactly_once)
    ensure_topics(settings, {settings.input_topic: 1, settings.output_topic: 1})
    ensure_topics(settings, {settings.dlq_topic: 1}, max_message_bytes=1024 * 1024)
    big_bad = {"key": None, "value": b"\x00" * (2 * 1024 * 1024)}
    send_raw(settings, [big_bad, *images(2)])
    results, _ = run_until_done(settings, tiny_embedder, 3, exactly_once)
    assert len(results.outputs) == 2
    [dead] = results.dead
    assert dead.key is None and dead.value == b""
    assert int(dict(dead.headers)[VALUE_OMITTED_HEADER]) == 2 * 1024 * 1024


@MODES
@KAFKA_CLIENTS
def test_dead_letters_the_dlq_cannot_take_are_cut_down_or_skipped(
    kafka_bootstrap, tiny_embedder, exactly_once, kafka_client
):
    settings = worker_settings(
        kafka_bootstrap, exactly_once=exactly_once, broker_lost_timeout_s=5, kafka_client=kafka_client
    )
    ensure_topics(settings, {settings.input_topic: 1, settings.output_topic: 1})
    ensure_topics(settings, {settings.dlq_topic: 1}, max_message_bytes=2048)
    huge_key = {"key": b"k" * 3000, "value": b"not an envelope"}
    send_raw(settings, [huge_key, *images(2)])
    results, worker = run_until_done(settings, tiny_embedder, 3, exactly_once)
    [dead] = results.dead
    assert int(dict(dead.headers)[KEY_TRUNCATED_HEADER]) == 3000
    assert dead.key == b"k" * 256
    assert worker.exit_codes == [0], "a dead letter that needs cutting down is no broker failure"

    # A DLQ limit below the worker's own error headers: nothing can make the dead letter fit.
    tiny = worker_settings(
        kafka_bootstrap, exactly_once=exactly_once, broker_lost_timeout_s=5, kafka_client=kafka_client
    )
    ensure_topics(tiny, {tiny.input_topic: 1, tiny.output_topic: 1})
    ensure_topics(tiny, {tiny.dlq_topic: 1}, max_message_bytes=200)
    send_raw(tiny, [{"key": b"x", "value": b"not an envelope"}, *images(2)])
    with running_worker(tiny, tiny_embedder) as worker:
        outputs = collect(tiny, expected=2, timeout_s=60, read_committed=exactly_once).outputs
        wait_until(
            lambda: committed_offsets(tiny, 1)[0] == 3, 30, "the undeliverable record stalled its partition"
        )
        assert worker.metrics.undeliverable._value.get() == 1
    assert len(outputs) == 2


@MODES
@KAFKA_CLIENTS
def test_header_name_that_is_not_utf8_is_dead_lettered_not_a_crash_loop(
    kafka_bootstrap, tiny_embedder, exactly_once, kafka_client
):
    settings = worker_settings(kafka_bootstrap, exactly_once=exactly_once, kafka_client=kafka_client)
    create_topics(settings)
    ok = images(3)
    unreadable = {"key": b"unreadable", "value": b"original bytes", "headers": [(NotUtf8("x"), b"v")]}
    send_raw(settings, [ok[0], unreadable, ok[1], ok[2]])
    results, worker = run_until_done(settings, tiny_embedder, 4, exactly_once)
    assert sorted(r["id"] for r in results.outputs) == ["ok-0", "ok-1", "ok-2"]
    [dead] = results.dead
    assert dict(dead.headers)[REASON_HEADER] == b"unreadable_record"
    assert dead.key == b"unreadable" and dead.value == b"original bytes", "raw bytes kept"
    assert worker.metrics.unreadable_records._value.get() == 1


@KAFKA_CLIENTS
def test_max_in_flight_one_keeps_going(kafka_bootstrap, tiny_embedder, kafka_client):
    settings = worker_settings(
        kafka_bootstrap, max_in_flight=1, batch_timeout_ms=10, kafka_client=kafka_client
    )
    create_topics(settings)
    send_raw(settings, images(5))
    results, _ = run_until_done(settings, tiny_embedder, 5, exactly_once=False)
    assert sorted(r["id"] for r in results.outputs) == [f"ok-{i}" for i in range(5)]


class SlowEmbedder(Embedder):
    """The tiny model, taking ``seconds`` per batch: slow work is not a silent broker."""

    def __init__(self, inner: Embedder, seconds: float) -> None:
        super().__init__(
            inner.model, inner.label, inner.revision, inner.preprocessing, inner.device, inner.dtype
        )
        self.seconds = seconds

    def launch(
        self, pixels: np.ndarray | Sequence[np.ndarray], heads: ScoreHeads | None = None
    ) -> PendingEmbeddings:
        threading.Event().wait(self.seconds)
        return super().launch(pixels, heads)


def test_slow_batches_are_not_taken_for_a_lost_broker(kafka_bootstrap, tiny_embedder):
    settings = worker_settings(kafka_bootstrap, broker_lost_timeout_s=1, batch_size=2, batch_timeout_ms=10)
    create_topics(settings)
    send_raw(settings, images(4))
    results, worker = run_until_done(settings, SlowEmbedder(tiny_embedder, 2.5), 4, exactly_once=False)
    assert len(results.outputs) == 4
    assert worker.exit_codes == [0]


class BrokenEmbedder(Embedder):
    """A bug in the inference stage: one vector short for every batch."""

    def __init__(self, inner: Embedder) -> None:
        super().__init__(
            inner.model, inner.label, inner.revision, inner.preprocessing, inner.device, inner.dtype
        )

    def launch(
        self, pixels: np.ndarray | Sequence[np.ndarray], heads: ScoreHeads | None = None
    ) -> PendingEmbeddings:
        return ShortResult(super().launch(pixels, heads).result()[:-1])


class ShortResult(PendingEmbeddings):
    """Vectors already computed, one too few."""

    def __init__(self, vectors: np.ndarray) -> None:
        super().__init__(torch.empty(0), None)
        self.short = vectors

    def result(self) -> np.ndarray:
        return self.short


@MODES
def test_a_dead_inference_thread_stops_the_worker_non_zero(kafka_bootstrap, tiny_embedder, exactly_once):
    settings = worker_settings(kafka_bootstrap, exactly_once=exactly_once)
    create_topics(settings)
    send_raw(settings, images(4))
    worker = start_worker(settings, BrokenEmbedder(tiny_embedder))
    worker.thread.join(timeout=60)
    assert not worker.thread.is_alive(), "the worker kept polling with a dead inference thread"
    assert worker.exit_codes == [ExitCode.STAGE_FAILED]
    assert worker.metrics.embedded._value.get() == 0, "a batch that was not published is not counted"
    published = len(collect(settings, expected=4, timeout_s=5).outputs)
    assert (committed_offsets(settings, 1)[0] or 0) <= published, "only published records are committed"


def test_output_topic_deleted_while_running_turns_unready_and_recovers(kafka_bootstrap, tiny_embedder):
    settings = worker_settings(kafka_bootstrap, metadata_max_age_ms=1000)
    create_topics(settings)
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    with running_worker(settings, tiny_embedder) as worker:
        send_raw(settings, images(2, "before"))
        assert len(collect(settings, expected=2, timeout_s=60).outputs) == 2
        admin.delete_topics([settings.output_topic])
        send_raw(settings, images(3, "during"))
        health = worker.health
        wait_until(lambda: health.readiness_problem() is not None, 60, "still ready with no output topic")
        assert settings.output_topic in (health.readiness_problem() or "")
        create_topics(settings)
        wait_until(
            lambda: health.readiness_problem() is None, 90, "not ready again after the topic came back"
        )
        wait_until(lambda: committed_offsets(settings, 1)[0] == 5, 60, "the records sent meanwhile were lost")
    admin.close()


def test_missing_input_topic_says_so_and_is_not_ready(kafka_bootstrap, tiny_embedder):
    settings = worker_settings(kafka_bootstrap)
    ensure_topics(settings, {settings.output_topic: 1, settings.dlq_topic: 1})
    with running_worker(settings, tiny_embedder) as worker:
        health = worker.health
        wait_until(
            lambda: "does not exist" in (health.readiness_problem() or ""),
            30,
            lambda: f"readiness said {health.readiness_problem()!r}",
        )
        assert "--input-topic" in (health.readiness_problem() or "")


@KAFKA_CLIENTS
def test_two_workers_with_one_group_instance_id_fence_the_older(kafka_bootstrap, tiny_embedder, kafka_client):
    settings = worker_settings(
        kafka_bootstrap, group_instance_id="same", session_timeout_ms=6000, kafka_client=kafka_client
    )
    create_topics(settings, partitions=2)
    first = start_worker(settings, tiny_embedder)
    wait_until(lambda: first.metrics.assigned_partitions._value.get() == 2, 60, "first never joined")
    second = start_worker(settings, tiny_embedder)
    # The fenced member learns it when it commits: give it work, a little more now and then until it has
    # had some (on a loaded machine its fetches can come after the other member has taken the first lot).
    try:
        deadline = time.monotonic() + 90
        round_number = 0
        while first.thread.is_alive() and time.monotonic() < deadline:
            send_raw(settings, images(10, prefix=f"round{round_number}"))
            round_number += 1
            first.thread.join(timeout=5)
        assert not first.thread.is_alive(), "the fenced worker kept running"
        assert first.exit_codes == [ExitCode.FENCED]
    finally:
        if second.thread.is_alive():
            second.shutdown()
