"""The unit of work that travels through the pipeline: a polled record and what is sent for it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from worker.errors import RejectReason
from worker.messages import Headers, Source


@dataclass
class InputRecord:
    """A polled record and what the worker knows of it so far."""

    source: Source
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int
    polled_at: float
    epoch: int = 0  # exactly-once mode: the transaction epoch it was polled in; stale after an abort

    @property
    def partition(self) -> TopicPartition:
        """The input partition the record came from."""
        return TopicPartition(self.source.topic, self.source.partition)


@dataclass
class Outgoing:
    """A record to (re)send: an embedding to the output topic or a rejected record to the DLQ."""

    record: InputRecord
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    is_dlq: bool
    reason: RejectReason | None = None
    attempt: int = 0
    not_before: float = 0.0


def send(
    producer: KafkaProducer,
    out: Outgoing,
    on_delivered: Callable[[Outgoing], None],
    on_failed: Callable[[Outgoing, BaseException], None],
) -> None:
    """Send ``out``; the broker's acknowledgement calls ``on_delivered``, any failure ``on_failed``.

    A send refused at once (a full buffer, a closed producer) takes the same failure path as a failed
    delivery. The callbacks run on the producer's I/O thread: they must not block.
    """
    try:
        future = producer.send(out.topic, key=out.key, value=out.value, headers=out.headers)
    except KafkaError as exc:
        on_failed(out, exc)
        return
    future.add_callback(lambda _metadata: on_delivered(out))
    future.add_errback(lambda exc: on_failed(out, exc))
