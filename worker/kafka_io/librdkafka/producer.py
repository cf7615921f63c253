"""librdkafka's producer behind the worker's :class:`~worker.kafka_io.types.Producer` Protocol.

librdkafka reports deliveries only from ``poll()`` or ``flush()`` of the producer, on the thread that
calls them. The adapter serves them from a small thread of its own (a ``poll`` waits without the GIL), so
its futures call back as kafka-python's do: once, on a thread of the client, whoever sends. Transactional
calls that librdkafka calls retriable are tried again, within a bound, before their error is raised.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka import Producer as Client
from confluent_kafka import TopicPartition as ClientTopicPartition

from worker.kafka_io.errors import UnansweredError, UnsendableRecordError
from worker.kafka_io.librdkafka.errors import layer_error, translate
from worker.kafka_io.types import DeliveryFuture, Headers, TopicPartition

log = logging.getLogger(__name__)
_SERVE_WAIT_S = 0.05
_MAX_BLOCK_S = 15.0  # how long a send waits for room in a full queue (kafka-python's max_block_ms)
_METADATA_TIMEOUT_S = 15.0
_TRANSACTION_CALL_S = 10.0  # one try of a transactional call
_TRANSACTION_BUDGET_S = 60.0  # all tries of one, while librdkafka calls its failure retriable
_TRANSACTION_RETRY_WAIT_S = 0.2


class Delivery:
    """One send's future: its callback or its errback runs once, on the delivery-report thread, or at
    once when added after the report came."""

    __slots__ = ("_callbacks", "_errbacks", "_error", "_lock", "_message")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._message: Message | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Any], None]] = []
        self._errbacks: list[Callable[[BaseException], None]] = []

    def report(self, error: KafkaError | None, message: Message) -> None:
        """librdkafka's delivery report for this send."""
        with self._lock:
            if error is not None:
                self._error = layer_error(error)
                calls: list[Callable[[Any], None]] = list(self._errbacks)
                outcome: Any = self._error
            else:
                self._message = message
                calls = list(self._callbacks)
                outcome = message
            self._callbacks.clear()
            self._errbacks.clear()
        for call in calls:
            try:
                call(outcome)
            except Exception:  # one caller's failing callback must not silence the others' reports
                log.exception("a delivery callback failed")

    def _done(self) -> bool:
        return self._message is not None or self._error is not None

    def add_callback(self, callback: Callable[[Any], None]) -> Delivery:
        """Call ``callback`` with the delivered message once the broker acknowledges it."""
        with self._lock:
            if not self._done():
                self._callbacks.append(callback)
                return self
            message = self._message
        if message is not None:
            callback(message)
        return self

    def add_errback(self, errback: Callable[[BaseException], None]) -> Delivery:
        """Call ``errback`` with the layer's error if the delivery fails."""
        with self._lock:
            if not self._done():
                self._errbacks.append(errback)
                return self
            error = self._error
        if error is not None:
            errback(error)
        return self


class ProducerAdapter:
    """A :class:`worker.kafka_io.types.Producer` over a confluent-kafka ``Producer``, with the thread that
    serves its delivery reports."""

    def __init__(self, producer: Client) -> None:
        self.client = producer
        self._closing = threading.Event()
        self._server = threading.Thread(target=self._serve, name="kafka-delivery-reports", daemon=True)
        self._server.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                self.client.poll(_SERVE_WAIT_S)
            except Exception:  # confluent-kafka re-raises from poll() what a delivery callback raised
                log.exception("serving delivery reports")

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> DeliveryFuture:
        """Queue a record; the future reports its delivery."""
        delivery = Delivery()
        deadline = 0.0
        while True:
            try:
                self.client.produce(
                    topic, value, key, headers=cast(Any, headers) or None, on_delivery=delivery.report
                )
                return delivery
            except BufferError:  # the queue is full: wait for deliveries to make room, as kafka-python does
                now = time.monotonic()
                deadline = deadline or now + _MAX_BLOCK_S
                if now >= deadline:
                    full = f"the producer's queue stayed full for {_MAX_BLOCK_S:.0f}s"
                    raise UnansweredError(full) from None
                time.sleep(_SERVE_WAIT_S)
            except KafkaException as exc:
                raise translate(exc) from exc
            except (TypeError, ValueError) as exc:
                raise UnsendableRecordError(f"{type(exc).__name__}: {exc}") from exc

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every queued record's delivery; raises if some are still waiting after ``timeout``."""
        left = self._call(self.client.flush, -1 if timeout is None else timeout)
        if left:
            raise UnansweredError(f"{left} record(s) still waiting for the broker after {timeout}s")

    def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` for queued records, fail the rest, stop serving reports."""
        try:
            self.client.flush(timeout)
            self.client.purge()
            self.client.poll(0)  # the purged records' reports: their errbacks say they were not delivered
        finally:
            self._closing.set()
            self._server.join(max(1.0, timeout))

    def topic_exists(self, topic: str) -> bool:
        """Whether ``topic`` exists (or the broker creates it on this request, if it auto-creates)."""
        try:
            described = self.client.list_topics(topic, timeout=_METADATA_TIMEOUT_S).topics.get(topic)
        except KafkaException:
            return False
        return described is not None and described.error is None

    def init_transactions(self) -> None:
        """Register the transactional id (aborting what its previous producer left open)."""
        self._call(self.client.init_transactions, _METADATA_TIMEOUT_S)

    def begin_transaction(self) -> None:
        """Open a transaction."""
        self._call(self.client.begin_transaction)

    def send_offsets_to_transaction(self, offsets: Mapping[TopicPartition, int], group: Any) -> None:
        """Add the consumed ``offsets`` to the open transaction."""
        listed = [ClientTopicPartition(tp.topic, tp.partition, offset) for tp, offset in offsets.items()]
        self._transactional(lambda timeout: self.client.send_offsets_to_transaction(listed, group, timeout))

    def commit_transaction(self) -> None:
        """Commit the open transaction (flushing its records first)."""
        self._transactional(self.client.commit_transaction)

    def abort_transaction(self) -> None:
        """Abort the open transaction."""
        self._transactional(self.client.abort_transaction)

    def _transactional(self, call: Callable[[float], Any]) -> None:
        """Run a transactional call, again while librdkafka says its failure is retriable (a timeout:
        the call goes on in the background, and trying again waits for its outcome)."""
        deadline = time.monotonic() + _TRANSACTION_BUDGET_S
        while True:
            try:
                call(_TRANSACTION_CALL_S)
                return
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                retriable = isinstance(error, KafkaError) and error.retriable()
                if not retriable or time.monotonic() >= deadline:
                    raise translate(exc) from exc
                time.sleep(_TRANSACTION_RETRY_WAIT_S)  # a failure that comes back at once must not spin

    @staticmethod
    def _call(call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except KafkaException as exc:
            raise translate(exc) from exc
