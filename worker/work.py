"""The unit of work that travels through the pipeline: a polled record and what is sent for it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from worker.errors import RejectReason
from worker.kafka_io import Producer, TopicPartition
from worker.kafka_io.errors import KafkaLayerError, UnansweredError
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
    undeliverable: str | None = None  # why it cannot be delivered at all: skipped, never sent


class BrokerWatch:
    """How long the broker has left sends unanswered: the only silence that says the broker is gone.

    Work that waits on the worker itself (a slow decode, a long batch) does not count, and neither does a
    send the broker answered with an error (it is there, and the error says what is wrong). Thread-safe:
    sends happen on the main and inference threads, answers arrive on the producer's I/O thread.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._awaiting = 0
        self._silent_since: float | None = None

    def sent(self) -> None:
        """A record was handed to the producer: an answer is due."""
        with self._lock:
            self._awaiting += 1
            if self._silent_since is None:
                self._silent_since = self._clock()

    def answered(self) -> None:
        """The broker answered a send (an acknowledgement or an error of its own)."""
        with self._lock:
            self._awaiting = max(0, self._awaiting - 1)
            self._silent_since = self._clock() if self._awaiting else None

    def unanswered(self) -> None:
        """A send timed out or lost its connection: the silence goes on (its retry is sent again)."""
        with self._lock:
            self._awaiting = max(0, self._awaiting - 1)

    def reset(self) -> None:
        """Forget every send: they were abandoned (an aborted transaction), none will be answered."""
        with self._lock:
            self._awaiting = 0
            self._silent_since = None

    def awaiting(self) -> int:
        """Sends handed to the producer and not answered yet (those of revoked partitions included)."""
        with self._lock:
            return self._awaiting

    def silent_for(self) -> float:
        """Seconds the broker has left sends unanswered; 0 when it answered the last one."""
        with self._lock:
            return 0.0 if self._silent_since is None else self._clock() - self._silent_since


def send(
    producer: Producer,
    out: Outgoing,
    on_delivered: Callable[[Outgoing], None],
    on_failed: Callable[[Outgoing, BaseException], None],
    watch: BrokerWatch,
) -> None:
    """Send ``out``; the broker's acknowledgement calls ``on_delivered``, any failure ``on_failed``.

    A send refused at once (a full buffer, a closed producer, a record the client cannot encode) takes the
    same failure path as a failed delivery. The callbacks run on the producer's I/O thread: they must not
    block. ``watch`` hears of the send and of whether the broker answered it.
    """

    def delivered(_metadata: object) -> None:
        watch.answered()
        on_delivered(out)

    def failed(exc: BaseException) -> None:
        if isinstance(exc, UnansweredError):
            watch.unanswered()
        else:
            watch.answered()
        on_failed(out, exc)

    watch.sent()
    try:
        future = producer.send(out.topic, out.key, out.value, out.headers)
    except KafkaLayerError as exc:
        failed(exc)
        return
    future.add_callback(delivered)
    future.add_errback(failed)
