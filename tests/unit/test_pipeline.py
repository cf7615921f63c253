"""The worker loop on the shared Kafka fake and a stub embedder: no broker, no model."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.fake_kafka import FakeConsumer, FakeProducer
from tests.support.stub_embedder import StubEmbedder
from worker.config import load_settings
from worker.devtools.samples import jpeg_corpus
from worker.errors import BrokerLostError, GroupInstanceFencedError
from worker.kafka_io import TopicPartition, UnreadableRecord
from worker.kafka_io.errors import InstanceFencedError
from worker.loop.pipeline import Pipeline
from worker.messages import REASON_HEADER, decode_embedding, encode_request
from worker.ops.health import HealthState
from worker.ops.metrics import WorkerMetrics
from worker.output.delivery import AtLeastOnce, ExactlyOnce
from worker.output.delivery.transactions import AbortReason
from worker.output.offsets import OffsetTracker
from worker.output.topic_limits import TopicLimits
from worker.work import BrokerWatch

TP = TopicPartition("images", 0)


def build(
    exactly_once: bool = False,
    consumer: FakeConsumer | None = None,
    embedder: StubEmbedder | None = None,
    **overrides: Any,
) -> tuple[Pipeline, FakeConsumer, FakeProducer]:
    values = {"batch_size": 4, "batch_timeout_ms": 10, "commit_interval_ms": 0, "device": "cpu", **overrides}
    if exactly_once:
        values.update(exactly_once=True, transactional_id="unit")
    settings = load_settings(values, environ={})
    consumer, producer = consumer or FakeConsumer(), FakeProducer(auto_ack=True)
    tracker, metrics = OffsetTracker(), WorkerMetrics()
    delivery: AtLeastOnce | ExactlyOnce
    if exactly_once:
        delivery = ExactlyOnce(producer, consumer, tracker, metrics, TopicLimits(), timeout_s=5.0)
    else:
        delivery = AtLeastOnce(producer, consumer, tracker, metrics)
    embedder = embedder or StubEmbedder()
    pipeline = Pipeline(settings, embedder, consumer, delivery, tracker, metrics, HealthState(), 4, 1)  # type: ignore[arg-type]
    return pipeline, consumer, producer


@contextlib.contextmanager
def running(pipeline: Pipeline) -> Iterator[Pipeline]:
    """The pipeline subscribed with its inference thread started; drained afterwards."""
    pipeline.subscribe()
    pipeline.inference.start()
    try:
        yield pipeline
    finally:
        pipeline.drain(grace_s=2.0)


def run_until(pipeline: Pipeline, done: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "the loop did not get there"
        pipeline.step()


def add_images(consumer: FakeConsumer, count: int) -> None:
    for index, data in enumerate(jpeg_corpus(count, 32, 24)):
        consumer.add("images", encode_request(f"img-{index}", data), key=f"img-{index}".encode())


def test_images_are_embedded_bad_records_dead_lettered_and_offsets_committed():
    pipeline, consumer, producer = build()
    add_images(consumer, 5)
    consumer.add("images", b"\xc1 not msgpack", key=b"bad")
    with running(pipeline):
        run_until(pipeline, lambda: consumer.committed.get(TP) == 6)
    outputs = [decode_embedding(sent.value or b"") for sent in producer.to("image-embeddings")]
    assert sorted(output["id"] for output in outputs) == [f"img-{i}" for i in range(5)]
    [dead] = producer.to("images.dlq")
    assert dead.key == b"bad" and dead.header_map[REASON_HEADER] == b"invalid_msgpack"


def test_a_record_the_client_could_not_decode_is_dead_lettered_with_its_key_and_value():
    pipeline, consumer, producer = build()
    add_images(consumer, 1)
    unreadable = UnreadableRecord("images", 0, 1, 5, b"odd", b"raw bytes", "header name is not UTF-8")
    consumer.log[TP].append(unreadable)  # type: ignore[arg-type]
    add_images(consumer, 1)
    with running(pipeline):
        run_until(pipeline, lambda: consumer.committed.get(TP) == 3)
    assert len(producer.to("image-embeddings")) == 2
    [dead] = producer.to("images.dlq")
    assert (dead.key, dead.value) == (b"odd", b"raw bytes")
    assert dead.header_map[REASON_HEADER] == b"unreadable_record"
    assert pipeline.metrics.unreadable_records._value.get() == 1


def test_one_record_in_flight_at_most_still_gets_through_everything():
    pipeline, consumer, producer = build(max_in_flight=1)
    add_images(consumer, 3)
    with running(pipeline):
        run_until(pipeline, lambda: consumer.committed.get(TP) == 3)
    assert len(producer.to("image-embeddings")) == 3


def test_exactly_once_commits_results_with_their_offsets_and_rewinds_after_a_rebalance():
    pipeline, consumer, producer = build(exactly_once=True)
    add_images(consumer, 4)
    with running(pipeline):
        run_until(pipeline, lambda: ("offsets", {TP: 4}) in producer.calls)
        assert producer.calls[-1] == ("commit", None)
        add_images(consumer, 2)
        consumer.revoke_all()  # the listener dooms the open transaction
        consumer.subscribe(["images"], consumer.listener)  # type: ignore[arg-type]
        assert pipeline.delivery.must_rewind
        pipeline.step()
        assert pipeline.metrics.transactions_aborted.labels("rebalance")._value.get() == 1
        run_until(pipeline, lambda: ("offsets", {TP: 6}) in producer.calls)


class FencedAtShutdown(FakeConsumer):
    """One record is done when the group is joined; the commit at shutdown finds the instance id taken."""

    tracker: OffsetTracker

    def subscribe(self, topics: list[str], listener: Any) -> None:
        super().subscribe(topics, listener)
        self.tracker.track(TP, 0)
        self.tracker.ack(TP, 0)

    def commit(self, offsets: Any, timeout_ms: int) -> None:
        raise InstanceFencedError("FencedInstanceIdError: another member took the id")


def test_fencing_found_by_the_last_commit_is_a_fenced_exit_not_a_crash():
    consumer = FencedAtShutdown()
    pipeline, _consumer, _producer = build(consumer=consumer, group_instance_id="w1")
    consumer.tracker = pipeline.tracker
    stop = threading.Event()
    stop.set()
    with pytest.raises(GroupInstanceFencedError, match="--group-instance-id"):
        pipeline.run(stop)


def test_an_abort_forgets_sends_the_broker_left_unanswered():
    pipeline, _consumer, _producer = build(exactly_once=True)
    delivery = pipeline.delivery
    assert isinstance(delivery, ExactlyOnce)
    delivery.watch.sent()
    delivery.watch.unanswered()  # a delivery timeout: it dooms the transaction
    delivery.transactions.doom(AbortReason.DELIVERY_FAILED)
    delivery.abort()
    assert delivery.watch.silent_for() == 0, "nothing will answer the abandoned sends: no silence to count"


class StrayPartition(FakeConsumer):
    """Each poll also returns the records of a partition the worker was never assigned (revoked while the
    client still buffered them)."""

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        out: dict[TopicPartition, list[Any]] = dict(super().poll(timeout_ms, max_records))
        stray = TopicPartition("images", 7)
        if self.log.get(stray):
            out[stray] = self.log.pop(stray)
        return out


def test_metrics_updated_per_poll_and_batch_still_count_every_record_once():
    consumer = StrayPartition(partitions=2)
    pipeline, _consumer, producer = build(consumer=consumer)
    for partition, count in ((0, 5), (1, 4)):
        for index, data in enumerate(jpeg_corpus(count, 32, 24)):
            consumer.add("images", encode_request(f"p{partition}-{index}", data), partition=partition)
    consumer.add("images", b"\xc1 not msgpack", partition=1)
    consumer.add("images", encode_request("stray", jpeg_corpus(1, 32, 24)[0]), partition=7)
    with running(pipeline):
        tp1 = TopicPartition("images", 1)
        run_until(pipeline, lambda: consumer.committed.get(TP) == 5 and consumer.committed.get(tp1) == 5)
    metrics = pipeline.metrics
    sample = metrics.registry.get_sample_value
    assert metrics.consumed._value.get() == 10, "every tracked record once; the stray one not at all"
    assert metrics.published._value.get() == 9 == len(producer.to("image-embeddings"))
    assert metrics.dlq.labels("invalid_msgpack")._value.get() == 1
    assert sample("clip_worker_stage_seconds_count", {"stage": "decode"}) == 9, "one decode per image"
    assert sample("clip_worker_stage_seconds_count", {"stage": "queue_wait"}) == 9, "one wait per image"
    assert sample("clip_worker_batch_size_images_sum") == 9


def test_sends_left_unanswered_past_the_deadline_stop_the_worker_after_their_partitions_are_lost():
    # librdkafka ends its session on its own when the broker vanishes: the partitions are lost, the
    # tracker forgets their records, and only the producer's unanswered sends still say the broker is gone.
    pipeline, _consumer, _producer = build(broker_lost_timeout_s=5)
    now = [100.0]
    watch = BrokerWatch(clock=lambda: now[0])
    pipeline.delivery.watch = watch
    with running(pipeline):
        watch.sent()
        pipeline.step()
        now[0] += 6.0
        assert pipeline.tracker.in_flight == 0
        with pytest.raises(BrokerLostError, match="has not answered a send for 6s with 1 record"):
            pipeline.step()
        watch.answered()
        pipeline.step()  # the broker answered: no silence left
