"""librdkafka's consumer behind the worker's :class:`~worker.kafka_io.types.Consumer` Protocol.

What differs from kafka-python, and how it is hidden:

- rebalance callbacks run inside :meth:`ConsumerAdapter.poll`, on the polling thread, not on an I/O
  thread: the listener sees the same calls (revoked, assigned, lost), only earlier and without racing
  the loop;
- a record librdkafka hands over but Python cannot read (a header name that is not UTF-8), or one
  librdkafka refuses with an error at its offset, comes back as an
  :class:`~worker.kafka_io.types.UnreadableRecord`, as kafka-python's record parser marks it;
- a synchronous commit has no timeout in librdkafka: it runs on a helper thread and the caller waits
  ``timeout_ms`` for it;
- librdkafka keeps no list of paused partitions: the adapter does;
- librdkafka's pause drops the records it has fetched ahead, and after a resume the first records come
  back only after about 0.85 s (measured on Apache Kafka 4 and librdkafka 2.16), while the worker's
  backpressure pauses every partition for a fraction of a second at a time. So a pause of every owned
  partition is first a hold: the adapter stops taking records, and librdkafka keeps what it fetched.
  Rebalance callbacks run only inside ``consume``, so a hold longer than :data:`HOLD_S` becomes librdkafka's
  own pause, and the adapter consumes again (serving those callbacks) without getting records.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, NamedTuple, cast

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message
from confluent_kafka import Consumer as Client
from confluent_kafka import TopicPartition as ClientTopicPartition

from worker.kafka_io.errors import UnansweredError
from worker.kafka_io.librdkafka.errors import RECORD_LEVEL, layer_error, translate
from worker.kafka_io.types import RebalanceListener, Record, TopicPartition, UnreadableRecord

log = logging.getLogger(__name__)
_METADATA_TIMEOUT_S = 0.5  # the loop asks whether its input topic exists: a short question
_READER_RETRY_S = 0.5
# Errors about the subscription rather than a record: the worker's own checks report them.
_QUIET = {KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC}
_NO_TIMESTAMP = 0  # librdkafka's TIMESTAMP_NOT_AVAILABLE
HOLD_S = 2.0
"""Longest a pause of every owned partition stays a hold before it becomes librdkafka's pause: it delays
the rebalance callbacks by as much."""
# confluent-kafka's Message.headers() returns a list *with an exception set* when a header name is not
# UTF-8. Called directly from a hot loop, CPython 3.11's specialised call skips the check that turns that
# into a SystemError, and the pending exception surfaces in some later, unrelated call. Called through
# methodcaller (a C-level call) the result is always checked, so the error is raised here, where it
# belongs; the list it came with is never touched.
_headers = operator.methodcaller("headers")


class ConsumedRecord(NamedTuple):
    """A polled record, with the fields of the layer's :class:`~worker.kafka_io.types.Record`."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] | None


def _client_tp(tp: TopicPartition, offset: int = -1001) -> ClientTopicPartition:
    return ClientTopicPartition(tp.topic, tp.partition, offset)


def read(message: Message) -> Record:
    """The layer's record for a message librdkafka handed over without an error."""
    kind, stamp = message.timestamp()
    timestamp = None if kind == _NO_TIMESTAMP else stamp
    try:
        headers = _headers(message)
    except Exception as exc:  # confluent-kafka decodes header names as UTF-8 and raises on others
        cause = exc.__cause__ or exc.__context__ or exc
        return _unreadable(message, timestamp, message.value(), f"its headers: {cause}")
    # Typed as optional by confluent-kafka, these are always set on a record handed over without an error.
    return ConsumedRecord._make(
        (
            message.topic(),
            message.partition(),
            message.offset(),
            timestamp,
            message.key(),
            message.value(),
            headers,
        )
    )


def _unreadable(message: Message, timestamp: int | None, value: bytes | None, problem: str) -> Record:
    offset = cast(int, message.offset())
    return UnreadableRecord(
        cast(str, message.topic()),
        cast(int, message.partition()),
        offset,
        timestamp,
        message.key(),
        value,
        f"record at offset {offset} cannot be decoded: {problem}",
    )


def refused(message: Message, error: KafkaError) -> Record | None:
    """A message that carries ``error``: an unreadable record when the error is about the record at its
    offset, None when it only says something passing or about the subscription; raises when the consumer
    cannot go on (fatal errors, fencing, a fetch refused)."""
    if error.fatal():
        raise layer_error(error)
    if error.code() in _QUIET:
        log.debug("consumer: %s", error.str())
        return None
    offset = message.offset()
    if error.code() in RECORD_LEVEL and message.topic() is not None and offset is not None and offset >= 0:
        problem = f"librdkafka refused it: {error.name()}: {error.str()}"
        return _unreadable(message, None, message.value() or b"", problem)
    if error.retriable() or message.topic() is None:
        log.warning("consumer: %s", error.str())
        return None
    # A fetch error reported at the fetch position (an authorisation refused, say) is no record: the
    # worker stops, as kafka-python's poll raises, rather than dead-letter an offset it never read.
    raise layer_error(error)


class ConsumerAdapter:
    """A :class:`worker.kafka_io.types.Consumer` over a confluent-kafka ``Consumer``.

    ``reader``: outside any group, every partition of the subscribed topics from its beginning, nothing
    committed (``tail``).
    """

    def __init__(
        self, consumer: Client, reader: bool = False, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.client = consumer
        self._clock = clock
        self._reader = reader
        self._reader_topics: list[str] = []
        self._next_reader_check = 0.0
        self._paused: set[TopicPartition] = set()
        self._paused_in_client: set[TopicPartition] = set()
        self._held_since: float | None = None  # a hold in progress: every owned partition paused
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="kafka-commit")
        self._commit: Future[Any] | None = None

    def subscribe(self, topics: list[str], listener: RebalanceListener) -> None:
        """Join the group on ``topics`` (a reader assigns itself their partitions instead)."""
        if self._reader:
            self._reader_topics = list(topics)
            self._assign_reader()
            return

        def assigned(_consumer: Client, partitions: list[ClientTopicPartition]) -> None:
            listener.on_partitions_assigned(self._ours(partitions))

        def revoked(_consumer: Client, partitions: list[ClientTopicPartition]) -> None:
            gone = self._ours(partitions)
            self._forget(gone)
            listener.on_partitions_revoked(gone)

        def lost(_consumer: Client, partitions: list[ClientTopicPartition]) -> None:
            gone = self._ours(partitions)
            self._forget(gone)
            listener.on_partitions_lost(gone)

        self._call(self.client.subscribe, topics, on_assign=assigned, on_revoke=revoked, on_lost=lost)

    def _forget(self, gone: set[TopicPartition]) -> None:
        self._paused -= gone
        self._paused_in_client -= gone

    @staticmethod
    def _ours(partitions: list[ClientTopicPartition]) -> set[TopicPartition]:
        return {TopicPartition(tp.topic, tp.partition) for tp in partitions}

    def _assign_reader(self) -> None:
        if time.monotonic() < self._next_reader_check:
            return
        self._next_reader_check = time.monotonic() + _READER_RETRY_S
        assigned = self.assignment()
        wanted = []
        for topic in self._reader_topics:
            for partition in self._partitions(topic):
                if TopicPartition(topic, partition) not in assigned:
                    wanted.append(ClientTopicPartition(topic, partition, OFFSET_BEGINNING))
        if wanted:
            self._call(self.client.incremental_assign, wanted)

    def _partitions(self, topic: str) -> list[int]:
        try:
            described = self.client.list_topics(topic, timeout=_METADATA_TIMEOUT_S).topics.get(topic)
        except KafkaException:
            return []
        if described is None or described.error is not None:
            return []
        return sorted(described.partitions)

    def poll(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartition, Sequence[Record]]:
        """Up to ``max_records`` records, grouped by partition; rebalance callbacks run in here."""
        if self._reader:
            self._assign_reader()
        if self._held_since is not None:
            if self._clock() - self._held_since < HOLD_S:
                time.sleep(timeout_ms / 1000)  # as a poll that finds nothing waits
                return {}
            self._pause_in_client(self._paused)  # held too long: librdkafka pauses, callbacks are served
        messages = self._call(self.client.consume, max_records, timeout_ms / 1000)
        polled: dict[TopicPartition, list[Record]] = {}
        tp: TopicPartition | None = None
        batch: list[Record] = []
        for message in messages:
            error = message.error()
            record = read(message) if error is None else refused(message, error)
            if record is None:
                continue
            if tp is None or tp.partition != record.partition or tp.topic != record.topic:
                tp = TopicPartition(record.topic, record.partition)
                batch = polled.setdefault(tp, [])
            batch.append(record)
        return polled

    def assignment(self) -> set[TopicPartition]:
        """The partitions this consumer owns now."""
        return self._ours(self._call(self.client.assignment))

    def pause(self, *partitions: TopicPartition) -> None:
        """Stop handing over records of these partitions (their position is kept). A pause of every owned
        partition is a hold at first (see the module's notes)."""
        if not partitions:
            return
        self._paused.update(partitions)
        if self._held_since is not None:
            return
        if not self._paused_in_client and self._paused >= self.assignment():
            self._held_since = self._clock()
            return
        self._pause_in_client(set(partitions))

    def resume(self, *partitions: TopicPartition) -> None:
        """Hand over records of these partitions again."""
        if not partitions:
            return
        self._paused.difference_update(partitions)
        if self._held_since is not None:
            self._held_since = None
            self._pause_in_client(self._paused)  # what stays paused without a hold is librdkafka's
        in_client = self._paused_in_client.intersection(partitions)
        if in_client:
            self._call(self.client.resume, [_client_tp(tp) for tp in in_client])
            self._paused_in_client -= in_client

    def _pause_in_client(self, partitions: set[TopicPartition]) -> None:
        self._held_since = None
        fresh = partitions - self._paused_in_client
        if fresh:
            self._call(self.client.pause, [_client_tp(tp) for tp in fresh])
            self._paused_in_client |= fresh

    def paused(self) -> set[TopicPartition]:
        """The paused partitions among those owned (a partition assigned again starts unpaused)."""
        return self._paused & self.assignment()

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Read ``partition`` again from ``offset`` (records already fetched past it are dropped)."""
        self._call(self.client.seek, _client_tp(partition, offset))

    def commit(self, offsets: Mapping[TopicPartition, int], timeout_ms: int) -> None:
        """Commit ``offsets`` (the next offset to read, per partition), waiting at most ``timeout_ms``.

        A commit still under way from an earlier call (the coordinator silent) fails this one at once,
        so a lost broker never piles up waiting threads.
        """
        if self._commit is not None and not self._commit.done():
            raise UnansweredError("the previous offset commit has not been answered yet")
        listed = [_client_tp(tp, offset) for tp, offset in offsets.items()]
        commit = self.client.commit
        self._commit = self._committer.submit(self._call, commit, offsets=listed, asynchronous=False)
        try:
            self._commit.result(timeout=timeout_ms / 1000)
        except FutureTimeout:
            raise UnansweredError(f"the offset commit was not answered within {timeout_ms} ms") from None

    def topic_exists(self, topic: str) -> bool:
        """Whether the cluster knows ``topic`` (asked of the broker, briefly)."""
        described = self._call(self.client.list_topics, topic, timeout=_METADATA_TIMEOUT_S).topics.get(topic)
        return described is not None and described.error is None

    def highwater(self, partition: TopicPartition) -> int | None:
        """The partition's end offset as of the last fetch, None before one."""
        try:
            _low, high = self.client.get_watermark_offsets(_client_tp(partition), cached=True)
        except KafkaException:
            return None
        return int(high) if high is not None and high >= 0 else None

    def group_metadata(self) -> Any:
        """The group's metadata, for ``send_offsets_to_transaction``."""
        return self._call(self.client.consumer_group_metadata)

    def close(self, timeout_ms: int) -> None:
        """Leave the group (committing nothing) and close, waiting at most ``timeout_ms``."""
        closing = threading.Thread(target=self._close_quietly, name="kafka-close", daemon=True)
        closing.start()
        closing.join(timeout_ms / 1000)
        self._committer.shutdown(wait=False)

    def _close_quietly(self) -> None:
        try:
            self.client.close()
        except (KafkaException, RuntimeError) as exc:
            log.debug("closing the consumer: %s", exc)

    @staticmethod
    def _call(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except KafkaException as exc:
            raise translate(exc) from exc


def reader_group() -> str:
    """A group id for a reader: librdkafka wants one, though a reader never joins or commits."""
    return f"clip-worker-reader-{uuid.uuid4().hex[:12]}"
