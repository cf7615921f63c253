"""Publishing results: embeddings to the output topic, rejected records to the DLQ, acknowledgements.

Every record is checked against its topic's ``max.message.bytes`` before it is sent: an output too large
is dead-lettered (``output_too_large``), and a dead letter too large is cut down step by step (see
:func:`_shrink`). A dead letter that cannot be delivered even then, or that the client refuses outright, is
*undeliverable*: logged with its coordinates, counted, and acknowledged so that its partition moves on.
That is the one case where a record leaves no trace in Kafka, and it takes a record the DLQ topic cannot
hold even without its value, headers and key.

At-least-once (the default): every send is tracked until the broker acknowledges it; a failed delivery is
retried with backoff, and one the broker refuses as too large is handled as above. Exactly-once: sends go
through :class:`worker.transactions.Transactions`; a failed delivery dooms the transaction instead, and a
refusal as too large lowers the topic's known limit for the records read again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import MessageSizeTooLargeError

from worker.config import Settings
from worker.errors import RejectReason
from worker.kafka_io import record_bytes
from worker.messages import (
    DLQ_HEADERS,
    HEADERS_OMITTED_HEADER,
    KEY_TRUNCATED_HEADER,
    NULL_VALUE_HEADER,
    VALUE_OMITTED_HEADER,
    ImageRequest,
    dlq_headers,
    encode_embedding,
)
from worker.metrics import WorkerMetrics
from worker.offsets import OffsetTracker
from worker.transactions import Transactions
from worker.work import BrokerWatch, InputRecord, Outgoing, UnsendableRecordError, send

log = logging.getLogger(__name__)
_RETRY_BACKOFF_S = 1.0
# A dead letter's key is cut to this many bytes when nothing else makes it fit its topic.
TRUNCATED_KEY_BYTES = 256
# After this long with deliveries failing (or unanswered) and none succeeding, the worker is not ready.
FAILING_AFTER_S = 5.0
UNANSWERED_AFTER_S = 15.0


class Publisher:
    """Sends each record's one result and turns acknowledgements into committable offsets.

    ``embedding`` and ``dead_letter`` run on the main and inference threads; acknowledgements and
    failures arrive on the producer's I/O thread and only touch thread-safe state.
    """

    def __init__(
        self,
        settings: Settings,
        producer: KafkaProducer,
        consumer: KafkaConsumer,
        tracker: OffsetTracker,
        metrics: WorkerMetrics,
        model_label: str,
        topic_limits: dict[str, int] | None = None,
        reopen: Callable[[], KafkaProducer] | None = None,
    ) -> None:
        self._settings = settings
        self._producer = producer
        self._tracker = tracker
        self._metrics = metrics
        self._model_label = model_label
        self._retries: deque[Outgoing] = deque()
        self._retries_lock = threading.Lock()
        self.watch = BrokerWatch()
        self._failing_since: float | None = None
        self._last_failure = ""
        self._limits = dict(topic_limits or {})
        # Exactly-once: the largest record each topic refused in the open transaction.
        self._refused: dict[str, int] = {}
        self.transactions: Transactions | None = None
        if settings.exactly_once:
            timeout = settings.broker_lost_timeout_s
            self.transactions = Transactions(
                producer,
                consumer,
                timeout,
                self._delivered,
                self._transaction_send_failed,
                reopen,
                self.watch,
            )

    def embedding(self, record: InputRecord, request: ImageRequest, vector: np.ndarray) -> None:
        """Publish the embedding of ``record`` (dead-lettered instead if it is too large to send)."""
        value = encode_embedding(
            request, vector, self._model_label, record.source, self._settings.forward_image
        )
        if len(value) > self._settings.max_message_bytes:
            message = f"output record is {len(value)} bytes, over --max-message-bytes"
            self.dead_letter(record, RejectReason.OUTPUT_TOO_LARGE, message)
            return
        key = record.key if record.key is not None else request.id.encode()
        self._send(Outgoing(record, self._settings.output_topic, key, value, record.headers, is_dlq=False))

    def dead_letter(self, record: InputRecord, reason: RejectReason, message: str) -> None:
        """Send ``record`` unchanged to the DLQ with the error headers."""
        log.debug("dead-letter %s: %s", record.source, message)
        headers = dlq_headers(record.headers, reason, message, record.source)
        value = record.value
        if record.key is None and value is None:
            # Kafka needs a key or a value: a null record (a tombstone without a key) goes as empty bytes.
            value = b""
            headers.append((NULL_VALUE_HEADER, b"true"))
        self._send(Outgoing(record, self._settings.dlq_topic, record.key, value, headers, True, reason))

    def resend_due(self) -> None:
        """Re-send the failed deliveries whose backoff has passed (at-least-once mode)."""
        now = time.monotonic()
        with self._retries_lock:
            due = [out for out in self._retries if out.not_before <= now]
            if not due:
                return
            self._retries = deque(out for out in self._retries if out.not_before > now)
        for out in due:
            self._metrics.publish_retries.inc()
            self._send(out)

    @property
    def producer(self) -> KafkaProducer:
        """The producer in use (exactly-once mode replaces one that got stuck)."""
        return self.transactions.producer if self.transactions is not None else self._producer

    @property
    def retrying(self) -> bool:
        """Some deliveries wait for their retry."""
        with self._retries_lock:
            return bool(self._retries)

    def after_abort(self) -> None:
        """Exactly-once: the transaction was aborted; records larger than those refused will not be sent."""
        for topic, size in self._refused.items():
            self._limits[topic] = min(self._limits.get(topic, size), size - 1)
            log.warning(
                "%s refused a record of %d bytes; larger ones are now handled as too large", topic, size
            )
        self._refused.clear()

    @property
    def failing(self) -> str | None:
        """Why deliveries have been failing, or unanswered, for a while, or None if they are not."""
        since = self._failing_since
        if since is not None and time.monotonic() - since >= FAILING_AFTER_S:
            return self._last_failure
        silent = self.watch.silent_for()
        if silent >= UNANSWERED_AFTER_S:
            # kafka-python retries a send to a deleted topic on its own until its delivery timeout (2 min)
            # without a word: the silence is the first sign.
            return (
                f"no result acknowledged by the broker for {silent:.0f}s; check that the topics "
                f"{self._settings.output_topic!r} and {self._settings.dlq_topic!r} exist and the broker is up"
            )
        return None

    def _send(self, out: Outgoing) -> None:
        limit = self._limits.get(out.topic)
        if limit is not None and out.undeliverable is None:
            size = record_bytes(out.key, out.value, out.headers)
            if size > limit:
                self._too_large(out, f"{size} bytes, over max.message.bytes {limit} of {out.topic}")
                return
        if self.transactions is not None:
            self.transactions.publish(out)  # an undeliverable record only takes its turn there
            return
        if out.undeliverable is not None:
            self._delivered(out)
            return
        send(self._producer, out, self._delivered, self._send_failed, self.watch)

    def _delivered(self, out: Outgoing) -> None:
        # Producer I/O thread: cheap, non-blocking bookkeeping only.
        self._failing_since = None
        self._tracker.ack(out.record.partition, out.record.source.offset)
        if out.undeliverable is not None:
            self._metrics.undeliverable.inc()
            log.error(
                "record %s could not be delivered to %s (%s); skipped, its offset moves on",
                out.record.source,
                out.topic,
                out.undeliverable,
            )
        elif out.is_dlq:
            assert out.reason is not None
            self._metrics.dlq.labels(out.reason.value).inc()
        else:
            self._metrics.published.inc()
            if out.record.timestamp_ms > 0:
                self._metrics.end_to_end_seconds.observe(
                    max(0.0, time.time() - out.record.timestamp_ms / 1000)
                )

    def _too_large(self, out: Outgoing, detail: str) -> None:
        if not out.is_dlq:
            self.dead_letter(out.record, RejectReason.OUTPUT_TOO_LARGE, f"output record is {detail}")
            return
        step = _shrink(out)
        if step is None:
            out.undeliverable = f"too large for {out.topic} even without its value, headers and key: {detail}"
        else:
            # Even the dead-letter topic refuses the record as it is: keep what identifies it (reason, source
            # coordinates) and say what was left out, rather than stall.
            log.error("dead letter of %s is %s; sending it %s", out.record.source, detail, step)
        self._send(out)

    def _failed_for_good(self, out: Outgoing, exc: BaseException) -> bool:
        """Handle a failure that retrying as is cannot heal; False if the send may be retried."""
        if isinstance(exc, MessageSizeTooLargeError):
            self._too_large(out, f"refused by the broker as too large ({exc})")
            return True
        if isinstance(exc, UnsendableRecordError):
            # Only our own dead letters can get here (outputs always have a key and a value); retrying the
            # same record would fail the same way.
            out.undeliverable = f"the Kafka client refused it: {exc}"
            self._delivered(out)
            return True
        return False

    def _note_failure(self, out: Outgoing, exc: BaseException) -> None:
        self._metrics.publish_failures.labels("dlq" if out.is_dlq else "output", type(exc).__name__).inc()
        self._last_failure = f"deliveries to {out.topic} are failing: {type(exc).__name__}: {exc}"
        if self._failing_since is None:
            self._failing_since = time.monotonic()

    def _send_failed(self, out: Outgoing, exc: BaseException) -> None:
        if self._failed_for_good(out, exc):
            return
        self._note_failure(out, exc)
        out.attempt += 1
        out.not_before = time.monotonic() + min(_RETRY_BACKOFF_S * out.attempt, 10.0)
        level = logging.WARNING if out.attempt == 1 or out.attempt % 10 == 0 else logging.DEBUG
        log.log(
            level,
            "delivery to %s failed for %s (attempt %d: %s); will retry",
            out.topic,
            out.record.source,
            out.attempt,
            exc,
        )
        with self._retries_lock:
            self._retries.append(out)

    def _transaction_send_failed(self, out: Outgoing, exc: BaseException) -> None:
        # Producer I/O thread. The transaction is doomed; remember what to send instead next time.
        if isinstance(exc, UnsendableRecordError):
            self._failed_for_good(out, exc)  # the transaction goes on without it
            return
        self._note_failure(out, exc)
        log.warning(
            "delivery to %s failed for %s (%s); aborting the transaction", out.topic, out.record.source, exc
        )
        if isinstance(exc, MessageSizeTooLargeError):
            # The records of one refused batch all report the error; the largest is the one too large.
            size = record_bytes(out.key, out.value, out.headers)
            self._refused[out.topic] = max(self._refused.get(out.topic, 0), size)


def _shrink(out: Outgoing) -> str | None:
    """Cut a dead letter down one step so that a smaller topic limit may take it; says what was cut.

    First the value (its size is recorded), then the original headers (their count is recorded), then the
    key beyond its first bytes (its length is recorded). None when nothing is left to cut.
    """
    if out.value:
        out.headers = [*out.headers, (VALUE_OMITTED_HEADER, str(len(out.value)).encode())]
        out.value = None if out.key is not None else b""  # Kafka needs a key or a value
        return "without its value"
    original = [name for name, _ in out.headers if name not in DLQ_HEADERS]
    if original:
        kept = [(name, data) for name, data in out.headers if name in DLQ_HEADERS]
        out.headers = [*kept, (HEADERS_OMITTED_HEADER, str(len(original)).encode())]
        return "without its original headers"
    if out.key is not None and len(out.key) > TRUNCATED_KEY_BYTES:
        out.headers = [*out.headers, (KEY_TRUNCATED_HEADER, str(len(out.key)).encode())]
        out.key = out.key[:TRUNCATED_KEY_BYTES]
        return f"with its key cut to {TRUNCATED_KEY_BYTES} bytes"
    return None
