"""The transaction bookkeeping of the exactly-once mode, against the shared fake producer.

The real broker side (fencing, read_committed, kill -9, rebalances) is in
tests/integration/test_exactly_once.py; here the order of sends and the offsets a commit carries.
"""

from __future__ import annotations

import threading
from typing import Any

from tests.support.fake_kafka import FakeConsumer, FakeProducer
from worker.kafka_io import TopicPartition
from worker.kafka_io.errors import KafkaLayerError
from worker.messages import Source
from worker.output.delivery.transactions import AbortReason, Transactions
from worker.work import InputRecord, Outgoing

TP = TopicPartition("images", 0)


def outgoing(offset: int, epoch: int = 0) -> Outgoing:
    record = InputRecord(Source("images", 0, offset), None, b"", [], 0, 0.0, epoch)
    return Outgoing(record, "out", None, f"result-{offset}".encode(), [], is_dlq=False)


def make(
    producer: FakeProducer | None = None, **options: Any
) -> tuple[Transactions, FakeProducer, list[int]]:
    producer = producer or FakeProducer()
    acked: list[int] = []
    transactions = Transactions(
        producer,
        FakeConsumer(),
        timeout_s=5.0,
        on_delivered=lambda out: acked.append(out.record.source.offset),
        on_failed=lambda out, exc: None,
        **options,
    )
    return transactions, producer, acked


def sent(producer: FakeProducer) -> list[Any]:
    return [value for name, value in producer.calls if name == "send"]


def test_results_are_sent_in_offset_order_and_committed_with_the_offset_after_them():
    transactions, producer, acked = make()
    for offset in (0, 1, 2):
        assert transactions.expect(TP, offset)
    transactions.publish(outgoing(2))
    transactions.publish(outgoing(1))
    assert sent(producer) == []  # offset 0 has no result yet
    transactions.publish(outgoing(0))
    assert sent(producer) == [b"result-0", b"result-1", b"result-2"]
    for future in producer.futures:
        future.success(None)
    assert transactions.commit(lambda: {TP: 3}) == {TP: 3}
    assert ("offsets", {TP: 3}) in producer.calls and producer.calls[-1] == ("commit", None)
    assert acked == [0, 1, 2]


def test_a_commit_whose_offsets_do_not_match_the_results_is_refused():
    transactions, _producer, _acked = make()
    transactions.expect(TP, 0)
    transactions.publish(outgoing(0))
    assert transactions.commit(lambda: {}) is None  # result sent but its acknowledgement is missing
    assert transactions.doomed is AbortReason.INCONSISTENT


def test_a_failed_delivery_dooms_the_transaction_and_the_abort_drops_older_results():
    transactions, producer, acked = make()
    transactions.expect(TP, 0)
    transactions.expect(TP, 1)
    transactions.publish(outgoing(0))
    producer.futures[0].failure(KafkaLayerError("refused"))
    assert transactions.doomed is AbortReason.DELIVERY_FAILED
    assert transactions.commit(lambda: {}) is None
    assert transactions.abort() is AbortReason.DELIVERY_FAILED
    assert ("abort", None) in producer.calls and transactions.doomed is None
    transactions.publish(outgoing(1, epoch=0))  # polled before the abort: dropped
    assert sent(producer) == [b"result-0"]
    assert transactions.expect(TP, 0)  # read again from the committed offset
    transactions.publish(outgoing(0, epoch=transactions.epoch))
    assert sent(producer) == [b"result-0", b"result-0"]
    assert acked == []


def test_nothing_sent_means_nothing_to_commit():
    transactions, producer, _acked = make()
    assert transactions.commit(lambda: {}) == {}
    assert producer.calls == []


class StuckProducer(FakeProducer):
    """Commits never return, as kafka-python's did after some broker restarts."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def commit_transaction(self) -> None:
        self.release.wait()

    def close(self, timeout: float) -> None:
        self.calls.append(("close", None))
        self.release.set()


def test_a_stuck_commit_replaces_the_producer_and_aborts_the_transaction():
    stuck = StuckProducer()
    fresh = FakeProducer()
    transactions, _producer, _acked = make(stuck, reopen=lambda: fresh, stuck_after_s=0.2)
    transactions.expect(TP, 0)
    transactions.publish(outgoing(0))
    stuck.futures[0].success(None)
    assert transactions.commit(lambda: {TP: 1}) is None
    assert transactions.doomed is AbortReason.PRODUCER_STUCK
    assert transactions.producer is fresh and fresh.calls == [("init", None)]
    assert transactions.abort() is AbortReason.PRODUCER_STUCK
    assert ("abort", None) not in fresh.calls  # the broker aborts the old transaction when init fences it
    assert ("close", None) in stuck.calls or stuck.release.wait(2)
