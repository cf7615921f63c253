"""Records too large for their topic: checked before sending, and handled when the broker refuses them.

The real broker case is tests/integration/test_output_faults.py; here the refusal paths it never reaches
(the limits it reads at start-up prevent them), against the shared fake producer.
"""

from __future__ import annotations

import numpy as np

from tests.support.fake_kafka import FakeConsumer, FakeProducer
from worker.config import load_settings
from worker.kafka_io.errors import RecordTooLargeError
from worker.messages import VALUE_OMITTED_HEADER, Request, Source, decode_embedding
from worker.ops.metrics import WorkerMetrics
from worker.output.delivery import AtLeastOnce, ExactlyOnce
from worker.output.offsets import OffsetTracker
from worker.output.publisher import Publisher
from worker.output.topic_limits import TopicLimits
from worker.work import InputRecord

SETTINGS = {"output_topic": "out", "dlq_topic": "dlq"}


def publisher(
    limits: dict[str, int] | None = None, exactly_once: bool = False
) -> tuple[Publisher, FakeProducer, AtLeastOnce | ExactlyOnce]:
    producer = FakeProducer()
    settings = load_settings({**SETTINGS, "forward_image": True, "exactly_once": exactly_once}, environ={})
    tracker = OffsetTracker()
    metrics = WorkerMetrics()
    topic_limits = TopicLimits(limits)
    delivery: AtLeastOnce | ExactlyOnce
    if exactly_once:
        delivery = ExactlyOnce(producer, FakeConsumer(), tracker, metrics, topic_limits, timeout_s=5.0)
    else:
        delivery = AtLeastOnce(producer, FakeConsumer(), tracker, metrics)
    return Publisher(settings, delivery, tracker, metrics, "tiny", topic_limits), producer, delivery


def record(size: int) -> tuple[InputRecord, Request]:
    image = bytes(size)
    request = Request(id="big", image=image, meta={})
    return InputRecord(Source("images", 0, 7), b"big", image, [], 0, 0.0), request


def test_an_output_over_the_topic_limit_is_dead_lettered_and_the_dead_letter_sent_without_value():
    publish, producer, _delivery = publisher({"out": 50_000, "dlq": 50_000})
    item, request = record(60_000)
    publish.embedding(item, request, np.ones(4, dtype=np.float32) / 2)
    [sent] = producer.sent
    topic, value, headers = sent.topic, sent.value, sent.header_map
    assert topic == "dlq" and value is None
    assert headers["clip-worker-reason"] == b"output_too_large"
    assert int(headers[VALUE_OMITTED_HEADER]) == 60_000


def test_a_broker_refusal_dead_letters_the_output_in_at_least_once_mode():
    publish, producer, _delivery = publisher()
    item, request = record(1_000)
    publish.embedding(item, request, np.ones(4, dtype=np.float32) / 2)
    assert producer.sent[0].topic == "out"
    producer.futures[0].failure(RecordTooLargeError("too large"))
    sent = producer.sent[1]
    topic, value, headers = sent.topic, sent.value, sent.header_map
    assert topic == "dlq" and value == item.value
    assert headers["clip-worker-reason"] == b"output_too_large"


def test_exactly_once_learns_the_limit_from_a_refusal_and_dead_letters_the_record_when_read_again():
    publish, producer, delivery = publisher(exactly_once=True)
    assert isinstance(delivery, ExactlyOnce)
    transactions = delivery.transactions
    item, request = record(1_000)
    tp = item.partition
    transactions.expect(tp, item.source.offset)
    publish.embedding(item, request, np.ones(4, dtype=np.float32) / 2)
    producer.futures[0].failure(RecordTooLargeError("too large"))
    assert transactions.doomed is not None
    delivery.abort()
    again = InputRecord(item.source, item.key, item.value, [], 0, 0.0, epoch=transactions.epoch)
    transactions.expect(tp, item.source.offset)
    publish.embedding(again, request, np.ones(4, dtype=np.float32) / 2)
    sent = producer.sent[-1]
    topic, value, headers = sent.topic, sent.value, sent.header_map
    assert topic == "dlq" and value == item.value
    assert headers["clip-worker-reason"] == b"output_too_large"


def test_output_dtype_float16_publishes_float16_embeddings():
    producer = FakeProducer()
    settings = load_settings({**SETTINGS, "output_dtype": "float16"}, environ={})
    tracker, metrics = OffsetTracker(), WorkerMetrics()
    delivery = AtLeastOnce(producer, FakeConsumer(), tracker, metrics)
    publish = Publisher(settings, delivery, tracker, metrics, "tiny")
    item, request = record(10)
    publish.embedding(item, request, np.ones(4, dtype=np.float32) / 2)
    [sent] = producer.sent
    assert sent.topic == "out" and sent.value is not None
    embedded = decode_embedding(sent.value)
    assert embedded["dtype"] == "float16" and embedded["embedding"].dtype == np.float16
    np.testing.assert_array_equal(embedded["embedding"], np.full(4, 0.5, dtype=np.float16))
