"""librdkafka behind the Kafka layer, without a broker: its options, its errors, its delivery futures, and
(on librdkafka's own mock cluster) the partitions it chooses for keyed records."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, Message
from confluent_kafka import TopicPartition as ClientTopicPartition

from worker.config import load_settings
from worker.errors import StartupError
from worker.kafka_io import clients, factories
from worker.kafka_io.errors import (
    InstanceFencedError,
    KafkaLayerError,
    ProducerFencedError,
    RecordTooLargeError,
    TransactionsRefusedError,
    UnansweredError,
)
from worker.kafka_io.librdkafka import factories as librdkafka
from worker.kafka_io.librdkafka import options
from worker.kafka_io.librdkafka.consumer import HOLD_S, ConsumedRecord, ConsumerAdapter, read, refused
from worker.kafka_io.librdkafka.errors import layer_error
from worker.kafka_io.librdkafka.producer import Delivery, ProducerAdapter
from worker.kafka_io.partitioner import key_partition
from worker.kafka_io.types import TopicPartition, UnreadableRecord


def test_the_setting_picks_the_library_in_one_place():
    assert clients.library(load_settings({}, environ={})) == clients.ClientLibrary.of(factories)
    chosen = clients.library(load_settings({"kafka_client": "librdkafka"}, environ={}))
    assert chosen == clients.ClientLibrary.of(librdkafka)


def test_librdkafka_without_confluent_kafka_names_the_fix(monkeypatch):
    # As if confluent-kafka were not installed: its factories cannot be imported.
    monkeypatch.delattr(sys.modules["worker.kafka_io.librdkafka"], "factories")
    monkeypatch.setitem(sys.modules, "worker.kafka_io.librdkafka.factories", None)
    with pytest.raises(StartupError, match=r"pip install 'clip-worker\[librdkafka\]'"):
        clients.library(load_settings({"kafka_client": "librdkafka"}, environ={}))


def test_one_set_of_security_flags_maps_onto_librdkafka(tmp_path: Path):
    ca = tmp_path / "ca.pem"
    ca.write_text("a CA bundle")
    settings = load_settings(
        {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_username": "user",
            "sasl_password": "secret",
            "ssl_cafile": str(ca),
        },
        environ={},
    )
    assert options.security_options(settings) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "user",
        "sasl.password": "secret",
        "ssl.ca.location": str(ca),
    }


def test_consumer_and_producer_options_say_what_kafka_pythons_say():
    settings = load_settings({"group_instance_id": "w-1", "max_message_bytes": 1 << 20}, environ={})
    consumer = options.consumer_options(settings, read_committed=True)
    assert consumer["enable.auto.commit"] is False
    assert consumer["isolation.level"] == "read_committed"
    assert consumer["partition.assignment.strategy"] == "cooperative-sticky"
    assert consumer["group.instance.id"] == "w-1"
    assert consumer["max.partition.fetch.bytes"] == 1 << 20
    # A full prefetch queue is looked at again within 10 ms, not librdkafka's 1 s: the worker drains it fast.
    assert consumer["fetch.queue.backoff.ms"] <= 10 < consumer["queued.min.messages"]
    producer = options.transactional_producer_options(settings, "txn", smallest_topic_limit=4096)
    assert producer["partitioner"] == "murmur2_random"
    assert producer["transactional.id"] == "txn" and producer["enable.idempotence"] is True
    assert producer["batch.size"] == factories.producer_batch_bytes(4096) < 4096
    assert producer["message.timeout.ms"] <= producer["transaction.timeout.ms"]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), RecordTooLargeError),
        (KafkaError(KafkaError._MSG_TIMED_OUT), UnansweredError),
        (KafkaError(KafkaError._TRANSPORT), UnansweredError),
        (KafkaError(KafkaError.NOT_ENOUGH_REPLICAS, retriable=True), UnansweredError),
        (KafkaError(KafkaError._FENCED, fatal=True), ProducerFencedError),
        (KafkaError(KafkaError.FENCED_INSTANCE_ID, fatal=True), InstanceFencedError),
        (KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED), TransactionsRefusedError),
        (KafkaError(KafkaError._INVALID_ARG, fatal=True), TransactionsRefusedError),
        (KafkaError(KafkaError.INVALID_TXN_STATE, txn_requires_abort=True), KafkaLayerError),
    ],
    ids=lambda value: value.name() if isinstance(value, KafkaError) else value.__name__,
)
def test_librdkafka_error_classes_map_to_the_workers_paths(error, kind):
    translated = layer_error(error)
    assert type(translated) is kind
    assert error.name() in str(translated)


def test_a_delivery_callback_added_after_the_report_still_runs():
    delivered = Delivery()
    delivered.report(None, Message(topic="t", partition=1, offset=7))
    seen: list[object] = []
    delivered.add_callback(seen.append)
    delivered.add_errback(seen.append)
    assert [message.offset() for message in seen] == [7]  # type: ignore[attr-defined]

    failed = Delivery()
    errors: list[BaseException] = []
    failed.add_errback(errors.append)
    failed.add_callback(errors.append)
    failed.report(KafkaError(KafkaError._MSG_TIMED_OUT), Message(topic="t"))
    assert [type(e) for e in errors] == [UnansweredError]


def test_a_record_whose_headers_python_cannot_read_is_handed_over_marked():
    class Unreadable(Message):
        def headers(self) -> None:
            raise SystemError("returned a result with an exception set") from UnicodeDecodeError(
                "utf-8", b"\xff", 0, 1, "invalid start byte"
            )

    fine = read(Message(topic="t", partition=2, offset=9, key=b"k", value=b"v", headers=[("a", b"b")]))
    assert fine == ConsumedRecord("t", 2, 9, None, b"k", b"v", [("a", b"b")])
    marked = read(Unreadable(topic="t", partition=2, offset=10, key=b"k", value=b"raw"))
    assert type(marked) is UnreadableRecord
    assert (marked.offset, marked.key, marked.value) == (10, b"k", b"raw")
    assert "utf-8" in marked.problem


def test_keyed_records_land_where_the_java_client_puts_them():
    # librdkafka's mock cluster (4 partitions per topic) stands in for a broker.
    settings = load_settings({}, environ={})
    config = {**options.producer_options(settings), "test.mock.num.brokers": 1, "linger.ms": 0}
    config.pop("logger")
    from confluent_kafka import Producer

    producer = ProducerAdapter(Producer(config))
    partitions = len(producer.client.list_topics("keyed", timeout=10).topics["keyed"].partitions)
    assert partitions > 1
    keys = [f"image-{i}".encode() for i in range(64)]
    landed: dict[bytes | None, int | None] = {}
    done = threading.Event()

    def on_delivered(message: Message) -> None:
        landed[message.key()] = message.partition()
        if len(landed) == len(keys):
            done.set()

    try:
        for key in keys:
            producer.send("keyed", key, b"value", []).add_callback(on_delivered)
        # Reported by the adapter's own thread: nobody here polls the producer.
        assert done.wait(20), f"{len(landed)} of {len(keys)} deliveries reported"
    finally:
        producer.close(timeout=5)
    assert landed == {key: key_partition(key, partitions) for key in keys}
    assert len(set(landed.values())) > 1


def test_only_a_record_level_error_dead_letters_the_record_at_its_offset():
    bad = KafkaError(KafkaError._BAD_MSG)
    marked = refused(Message(topic="t", partition=0, offset=4, value=b"raw", error=bad), bad)
    assert type(marked) is UnreadableRecord and (marked.offset, marked.value) == (4, b"raw")
    passing = KafkaError(KafkaError._TRANSPORT, retriable=True)
    assert refused(Message(topic="t", partition=0, offset=4, error=passing), passing) is None
    # A fetch refused is reported at the fetch position: no record was read there, so nothing is skipped.
    denied = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaLayerError, match="TOPIC_AUTHORIZATION_FAILED"):
        refused(Message(topic="t", partition=0, offset=4, error=denied), denied)


def test_a_failing_delivery_callback_does_not_keep_the_others_from_their_reports():
    delivery = Delivery()
    seen: list[int] = []

    def broken(_message: object) -> None:
        raise RuntimeError("a caller's bug")

    delivery.add_callback(broken)
    delivery.add_callback(lambda message: seen.append(message.offset()))
    delivery.report(None, Message(topic="t", partition=0, offset=3))
    assert seen == [3]


def test_a_producer_epoch_librdkafka_can_bump_is_an_abort_not_a_fencing():
    bumpable = KafkaError(KafkaError.INVALID_PRODUCER_EPOCH, txn_requires_abort=True)
    assert type(layer_error(bumpable)) is KafkaLayerError
    fatal = KafkaError(KafkaError.INVALID_PRODUCER_EPOCH, fatal=True)
    assert type(layer_error(fatal)) is ProducerFencedError


class RecordingClient:
    """A confluent-kafka Consumer stand-in that owns two partitions and records pause, resume and consume."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.owned = [ClientTopicPartition("in", 0), ClientTopicPartition("in", 1)]

    def assignment(self) -> list[ClientTopicPartition]:
        return self.owned

    def pause(self, partitions: list[ClientTopicPartition]) -> None:
        self.calls.append(("pause", sorted(tp.partition for tp in partitions)))

    def resume(self, partitions: list[ClientTopicPartition]) -> None:
        self.calls.append(("resume", sorted(tp.partition for tp in partitions)))

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        self.calls.append(("consume", num_messages))
        return []


def test_a_short_pause_of_every_partition_keeps_what_librdkafka_fetched_ahead():
    # librdkafka's own pause drops the records fetched ahead and takes ~0.85 s to fetch again after a
    # resume: the backpressure's short pauses are held by the adapter instead.
    now = [100.0]
    client = RecordingClient()
    adapter = ConsumerAdapter(client, clock=lambda: now[0])  # type: ignore[arg-type]
    owned = {TopicPartition("in", 0), TopicPartition("in", 1)}
    adapter.pause(*owned)
    assert adapter.paused() == owned
    assert adapter.poll(10, 10) == {}
    adapter.resume(*owned)
    assert adapter.poll(100, 10) == {}
    assert client.calls == [("consume", 10)], "held: not paused in librdkafka, nothing consumed while held"
    assert adapter.paused() == set()


def test_a_long_pause_becomes_librdkafkas_so_rebalances_are_still_served():
    now = [100.0]
    client = RecordingClient()
    adapter = ConsumerAdapter(client, clock=lambda: now[0])  # type: ignore[arg-type]
    owned = {TopicPartition("in", 0), TopicPartition("in", 1)}
    adapter.pause(*owned)
    now[0] += HOLD_S + 0.1
    adapter.poll(100, 10)
    assert client.calls == [("pause", [0, 1]), ("consume", 10)]
    adapter.resume(TopicPartition("in", 0))
    assert client.calls[-1] == ("resume", [0])
    assert adapter.paused() == {TopicPartition("in", 1)}


def test_pausing_some_partitions_pauses_them_in_librdkafka_at_once():
    client = RecordingClient()
    adapter = ConsumerAdapter(client)  # type: ignore[arg-type]
    adapter.pause(TopicPartition("in", 1))
    assert client.calls == [("pause", [1])]
    adapter.resume(TopicPartition("in", 1))
    assert client.calls == [("pause", [1]), ("resume", [1])]


def test_all_brokers_down_does_not_hide_why_the_connection_failed():
    last = librdkafka._LastError()
    last(KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error: Authentication failed"))
    last(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    assert factories.fatal_reason("b:9093", last.text) is not None
