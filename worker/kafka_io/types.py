"""The Kafka client calls the worker makes, as Protocols: the runtime depends on these, not on a client.

kafka-python's adapters (:mod:`worker.kafka_io.adapters`) implement them, and so does the shared in-memory
fake of the tests (``tests/support/fake_kafka.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

Headers = list[tuple[str, bytes]]


class TopicPartition(NamedTuple):
    """A partition of a topic. Equal (and hashing equal) to kafka-python's own ``TopicPartition``."""

    topic: str
    partition: int


class Record(Protocol):
    """A polled record (kafka-python's ``ConsumerRecord`` has these fields)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int | None: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]] | None: ...


@dataclass(frozen=True, slots=True)
class UnreadableRecord:
    """A polled :class:`Record` the client could not decode: its key and value as far as they could be read
    (its raw bytes as the value when not even that), no headers, and ``problem`` saying why."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None
    key: bytes | None
    value: bytes | None
    problem: str
    headers: tuple[tuple[str, bytes | None], ...] = ()


class RebalanceListener(Protocol):
    """Told of assignment changes. Called on the client's I/O thread: it must not block."""

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None: ...
    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None: ...
    def on_partitions_lost(self, lost: set[TopicPartition]) -> None: ...


class IgnoreRebalances:
    """A :class:`RebalanceListener` for a consumer outside any group, which is never rebalanced."""

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        return

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        return

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        return


class Consumer(Protocol):
    """The consumer calls of the worker. Errors are :mod:`worker.kafka_io.errors` types."""

    def subscribe(self, topics: list[str], listener: RebalanceListener) -> None: ...
    def poll(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartition, Sequence[Record]]: ...
    def assignment(self) -> set[TopicPartition]: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def paused(self) -> set[TopicPartition]: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    def commit(self, offsets: Mapping[TopicPartition, int], timeout_ms: int) -> None: ...
    def topic_exists(self, topic: str) -> bool: ...
    def highwater(self, partition: TopicPartition) -> int | None: ...
    def group_metadata(self) -> Any: ...
    def close(self, timeout_ms: int) -> None: ...


class DeliveryFuture(Protocol):
    """A send's outcome: exactly one of the callbacks runs, on the client's I/O thread."""

    def add_callback(self, callback: Callable[[Any], None]) -> Any: ...
    def add_errback(self, errback: Callable[[BaseException], None]) -> Any: ...


class Producer(Protocol):
    """The producer calls of the worker, transactions included. Errors are :mod:`worker.kafka_io.errors`
    types, in the futures too."""

    def send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers
    ) -> DeliveryFuture: ...
    def flush(self, timeout: float | None = None) -> None: ...
    def close(self, timeout: float) -> None: ...
    def topic_exists(self, topic: str) -> bool: ...
    def init_transactions(self) -> None: ...
    def begin_transaction(self) -> None: ...
    def send_offsets_to_transaction(self, offsets: Mapping[TopicPartition, int], group: Any) -> None: ...
    def commit_transaction(self) -> None: ...
    def abort_transaction(self) -> None: ...
