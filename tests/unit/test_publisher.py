"""Records too large for their topic: checked before sending, and handled when the broker refuses them.

The real broker case is tests/integration/test_output_faults.py; here the refusal paths it never reaches
(the limits it reads at start-up prevent them), against a recording stand-in for the producer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from kafka.errors import MessageSizeTooLargeError
from kafka.future import Future

from worker.config import load_settings
from worker.messages import VALUE_OMITTED_HEADER, ImageRequest, Source
from worker.metrics import WorkerMetrics
from worker.offsets import OffsetTracker
from worker.publisher import Publisher
from worker.work import InputRecord

SETTINGS = {"output_topic": "out", "dlq_topic": "dlq"}


class RecordingProducer:
    """Records sends; each send's future is resolved by the test."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, dict[str, bytes]]] = []
        self.futures: list[Future] = []

    def send(self, topic: str, key: Any, value: bytes | None, headers: list[tuple[str, bytes]]) -> Future:
        self.sent.append((topic, value, dict(headers)))
        future = Future()
        self.futures.append(future)
        return future

    def begin_transaction(self) -> None:
        pass

    def flush(self, timeout: float) -> None:
        pass

    def abort_transaction(self) -> None:
        pass


def publisher(
    limits: dict[str, int] | None = None, exactly_once: bool = False
) -> tuple[Publisher, RecordingProducer]:
    producer = RecordingProducer()
    settings = load_settings({**SETTINGS, "forward_image": True, "exactly_once": exactly_once}, environ={})
    tracker = OffsetTracker()
    return Publisher(settings, producer, None, tracker, WorkerMetrics(), "tiny", limits), producer


def record(size: int) -> tuple[InputRecord, ImageRequest]:
    image = bytes(size)
    request = ImageRequest(id="big", image=image, meta={})
    return InputRecord(Source("images", 0, 7), b"big", image, [], 0, 0.0), request


def test_an_output_over_the_topic_limit_is_dead_lettered_and_the_dead_letter_sent_without_value():
    publish, producer = publisher({"out": 50_000, "dlq": 50_000})
    item, request = record(60_000)
    publish.embedding(item, request, np.ones(4, dtype=np.float32) / 2)
    [(topic, value, headers)] = producer.sent
    assert topic == "dlq" and value is None
    assert headers["clip-worker-reason"] == b"output_too_large"
    assert int(headers[VALUE_OMITTED_HEADER]) == 60_000


def test_a_broker_refusal_dead_letters_the_output_in_at_least_once_mode():
    publish, producer = publisher()
    item, request = record(1_000)
    publish.embedding(item, request, np.ones(4, dtype=np.float32) / 2)
    assert producer.sent[0][0] == "out"
    producer.futures[0].failure(MessageSizeTooLargeError())
    topic, value, headers = producer.sent[1]
    assert topic == "dlq" and value == item.value
    assert headers["clip-worker-reason"] == b"output_too_large"


def test_exactly_once_learns_the_limit_from_a_refusal_and_dead_letters_the_record_when_read_again():
    publish, producer = publisher(exactly_once=True)
    transactions = publish.transactions
    assert transactions is not None
    item, request = record(1_000)
    tp = item.partition
    transactions.expect(tp, item.source.offset)
    publish.embedding(item, request, np.ones(4, dtype=np.float32) / 2)
    producer.futures[0].failure(MessageSizeTooLargeError())
    assert transactions.doomed is not None
    transactions.abort()
    publish.after_abort()
    again = InputRecord(item.source, item.key, item.value, [], 0, 0.0, epoch=transactions.epoch)
    transactions.expect(tp, item.source.offset)
    publish.embedding(again, request, np.ones(4, dtype=np.float32) / 2)
    topic, value, headers = producer.sent[-1]
    assert topic == "dlq" and value == item.value
    assert headers["clip-worker-reason"] == b"output_too_large"
