"""kafka-python behind the worker's Protocols: every call's errors become :mod:`worker.kafka_io.errors`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as ClientTopicPartition

from worker.kafka_io.errors import UnsendableRecordError, translate
from worker.kafka_io.record_parser import UnreadableHeaders, marked_unreadable
from worker.kafka_io.types import DeliveryFuture, Headers, RebalanceListener, Record, TopicPartition

P = ParamSpec("P")
T = TypeVar("T")


def _translated(call: Callable[P, T]) -> Callable[P, T]:
    @functools.wraps(call)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return call(*args, **kwargs)
        except KafkaError as exc:
            raise translate(exc) from exc

    return wrapper


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, listener: RebalanceListener) -> None:
        self._listener = listener

    def on_partitions_revoked(self, revoked: set[Any]) -> None:
        self._listener.on_partitions_revoked({TopicPartition(*tp) for tp in revoked})

    def on_partitions_assigned(self, assigned: set[Any]) -> None:
        self._listener.on_partitions_assigned({TopicPartition(*tp) for tp in assigned})

    def on_partitions_lost(self, lost: set[Any]) -> None:
        self._listener.on_partitions_lost({TopicPartition(*tp) for tp in lost})


def _client_tp(tp: TopicPartition) -> ClientTopicPartition:
    # kafka-python type-checks partitions: equal tuples of another class are refused.
    return ClientTopicPartition(tp.topic, tp.partition)


def _offsets(offsets: Mapping[TopicPartition, int]) -> dict[ClientTopicPartition, OffsetAndMetadata]:
    return {_client_tp(tp): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}


class ConsumerAdapter:
    """A :class:`worker.kafka_io.types.Consumer` over a ``KafkaConsumer``."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        self.client = consumer

    @_translated
    def subscribe(self, topics: list[str], listener: RebalanceListener) -> None:
        self.client.subscribe(topics, listener=_Listener(listener))

    @_translated
    def poll(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartition, Sequence[Record]]:
        # kafka-python's TopicPartition is a namedtuple of the same fields: equal keys, no copy needed.
        polled: dict[TopicPartition, Sequence[Record]] = self.client.poll(
            timeout_ms=timeout_ms, max_records=max_records
        )
        for tp, records in polled.items():
            if any(type(record.headers) is UnreadableHeaders for record in records):
                polled[tp] = [marked_unreadable(record) for record in records]
        return polled

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(*tp) for tp in self.client.assignment()}

    def pause(self, *partitions: TopicPartition) -> None:
        self.client.pause(*map(_client_tp, partitions))

    def resume(self, *partitions: TopicPartition) -> None:
        self.client.resume(*map(_client_tp, partitions))

    def paused(self) -> set[TopicPartition]:
        return {TopicPartition(*tp) for tp in self.client.paused()}

    @_translated
    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.client.seek(_client_tp(partition), offset)

    @_translated
    def commit(self, offsets: Mapping[TopicPartition, int], timeout_ms: int) -> None:
        self.client.commit(_offsets(offsets), timeout_ms=timeout_ms)

    @_translated
    def topic_exists(self, topic: str) -> bool:
        return bool(self.client.partitions_for_topic(topic))

    def highwater(self, partition: TopicPartition) -> int | None:
        value = self.client.highwater(_client_tp(partition))
        return int(value) if value is not None else None

    def group_metadata(self) -> Any:
        return self.client.group_metadata()

    @_translated
    def close(self, timeout_ms: int) -> None:
        self.client.close(autocommit=False, timeout_ms=timeout_ms)


class _TranslatedFuture:
    """A send's future whose errback receives the worker's error types."""

    def __init__(self, future: Any) -> None:
        self._future = future

    def add_callback(self, callback: Callable[[Any], None]) -> Any:
        return self._future.add_callback(callback)

    def add_errback(self, errback: Callable[[BaseException], None]) -> Any:
        return self._future.add_errback(lambda exc: errback(translate(exc)))


class ProducerAdapter:
    """A :class:`worker.kafka_io.types.Producer` over a ``KafkaProducer``."""

    def __init__(self, producer: KafkaProducer) -> None:
        self.client = producer

    @_translated
    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> DeliveryFuture:
        try:
            future = self.client.send(topic, key=key, value=value, headers=headers)
        except (ValueError, TypeError, AssertionError) as exc:
            raise UnsendableRecordError(f"{type(exc).__name__}: {exc}") from exc
        return _TranslatedFuture(future)

    @_translated
    def flush(self, timeout: float | None = None) -> None:
        self.client.flush(timeout=timeout)

    @_translated
    def close(self, timeout: float) -> None:
        self.client.close(timeout=timeout)

    def topic_exists(self, topic: str) -> bool:
        try:
            self.client.partitions_for(topic)  # waits up to the producer's max_block_ms for metadata
        except KafkaError:
            return False
        return True

    @_translated
    def init_transactions(self) -> None:
        self.client.init_transactions()

    @_translated
    def begin_transaction(self) -> None:
        self.client.begin_transaction()

    @_translated
    def send_offsets_to_transaction(self, offsets: Mapping[TopicPartition, int], group: Any) -> None:
        self.client.send_offsets_to_transaction(_offsets(offsets), group)

    @_translated
    def commit_transaction(self) -> None:
        self.client.commit_transaction()

    @_translated
    def abort_transaction(self) -> None:
        self.client.abort_transaction()
