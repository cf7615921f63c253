"""The one in-memory stand-in for the Kafka layer's Protocols (worker.kafka_io.types), for unit tests.

Integration tests use a real broker; these fakes let the pipeline, the publisher and the delivery
guarantees be driven step by step: sends are recorded and their futures resolved by the test (or at once
with ``auto_ack``), polls serve the records the test added.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.kafka_io import RebalanceListener, TopicPartition
from worker.kafka_io.errors import UnsendableRecordError


class FakeFuture:
    """A send's outcome, resolved by :meth:`success` or :meth:`failure` (callbacks run then, or at once if
    already resolved)."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[Any], None]] = []
        self._errbacks: list[Callable[[BaseException], None]] = []
        self.outcome: tuple[str, Any] | None = None

    def add_callback(self, callback: Callable[[Any], None]) -> FakeFuture:
        if self.outcome is None:
            self._callbacks.append(callback)
        elif self.outcome[0] == "ok":
            callback(self.outcome[1])
        return self

    def add_errback(self, errback: Callable[[BaseException], None]) -> FakeFuture:
        if self.outcome is None:
            self._errbacks.append(errback)
        elif self.outcome[0] == "error":
            errback(self.outcome[1])
        return self

    def success(self, metadata: Any = None) -> None:
        self.outcome = ("ok", metadata)
        for callback in self._callbacks:
            callback(metadata)

    def failure(self, exc: BaseException) -> None:
        self.outcome = ("error", exc)
        for errback in self._errbacks:
            errback(exc)


@dataclass
class Sent:
    """One record handed to :class:`FakeProducer`."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    future: FakeFuture

    @property
    def header_map(self) -> dict[str, bytes]:
        return dict(self.headers)


class FakeProducer:
    """Records every call in ``calls`` and every send in ``sent``."""

    def __init__(self, auto_ack: bool = False, missing_topics: set[str] | None = None) -> None:
        self.auto_ack = auto_ack
        self.missing_topics = missing_topics or set()
        self.calls: list[tuple[str, Any]] = []
        self.sent: list[Sent] = []
        self.fail_calls: dict[str, BaseException] = {}  # call name -> error it raises next time

    def _call(self, name: str, detail: Any = None) -> None:
        self.calls.append((name, detail))
        if name in self.fail_calls:
            raise self.fail_calls.pop(name)

    def send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> FakeFuture:
        if key is None and value is None:
            raise UnsendableRecordError("ValueError: Need at least one: key or value")
        self._call("send", value)
        future = FakeFuture()
        self.sent.append(Sent(topic, key, value, list(headers), future))
        if self.auto_ack:
            future.success()
        return future

    @property
    def futures(self) -> list[FakeFuture]:
        """The futures of the sends, in order."""
        return [sent.future for sent in self.sent]

    def to(self, topic: str) -> list[Sent]:
        """The records sent to ``topic``."""
        return [sent for sent in self.sent if sent.topic == topic]

    def flush(self, timeout: float | None = None) -> None:
        self._call("flush")

    def close(self, timeout: float) -> None:
        self._call("close")

    def topic_exists(self, topic: str) -> bool:
        return topic not in self.missing_topics

    def init_transactions(self) -> None:
        self._call("init")

    def begin_transaction(self) -> None:
        self._call("begin")

    def send_offsets_to_transaction(self, offsets: Mapping[TopicPartition, int], group: Any) -> None:
        self._call("offsets", dict(offsets))

    def commit_transaction(self) -> None:
        self._call("commit")

    def abort_transaction(self) -> None:
        self._call("abort")


@dataclass(frozen=True)
class FakeRecord:
    """A record as the consumer returns it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]] = ()
    timestamp: int | None = None


@dataclass
class FakeConsumer:
    """Serves the records added with :meth:`add` from each partition's position; assigns every partition
    of the subscribed topics to itself at once."""

    partitions: int = 1
    log: dict[TopicPartition, list[FakeRecord]] = field(default_factory=dict)
    positions: dict[TopicPartition, int] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    paused_partitions: set[TopicPartition] = field(default_factory=set)
    missing_topics: set[str] = field(default_factory=set)
    listener: RebalanceListener | None = None
    assigned: set[TopicPartition] = field(default_factory=set)

    def add(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int = 0,
        headers: Sequence[tuple[str, bytes | None]] = (),
    ) -> FakeRecord:
        """Append a record to a partition's log."""
        records = self.log.setdefault(TopicPartition(topic, partition), [])
        record = FakeRecord(topic, partition, len(records), key, value, headers)
        records.append(record)
        return record

    def subscribe(self, topics: list[str], listener: RebalanceListener) -> None:
        self.listener = listener
        self.assigned = {TopicPartition(t, p) for t in topics for p in range(self.partitions)}
        for tp in self.assigned:
            self.positions.setdefault(tp, self.committed.get(tp, 0))
        listener.on_partitions_assigned(set(self.assigned))

    def revoke_all(self) -> None:
        """A rebalance takes every partition away (the listener is told, as the client's I/O thread would)."""
        revoked, self.assigned = self.assigned, set()
        assert self.listener is not None
        self.listener.on_partitions_revoked(revoked)

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[FakeRecord]]:
        out: dict[TopicPartition, list[FakeRecord]] = {}
        for tp in sorted(self.assigned - self.paused_partitions):
            position = self.positions.get(tp, 0)
            batch = self.log.get(tp, [])[position : position + max_records]
            if batch:
                out[tp] = batch
                self.positions[tp] = position + len(batch)
                max_records -= len(batch)
            if max_records <= 0:
                break
        return out

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused_partitions.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused_partitions.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_partitions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.positions[partition] = offset

    def commit(self, offsets: Mapping[TopicPartition, int], timeout_ms: int) -> None:
        self.committed.update(offsets)

    def topic_exists(self, topic: str) -> bool:
        return topic not in self.missing_topics

    def highwater(self, partition: TopicPartition) -> int | None:
        return len(self.log.get(partition, []))

    def group_metadata(self) -> str:
        return "group"

    def close(self, timeout_ms: int) -> None:
        pass
