"""Publishing results: embeddings to the output topic, rejected records to the DLQ, acknowledgements.

Every record is checked against its topic's ``max.message.bytes`` before it is sent: an output too large
is dead-lettered (``output_too_large``) and a dead letter too large goes without its value. At-least-once
(the default): every send is tracked until the broker acknowledges it; a failed delivery is retried with
backoff, and one the broker refuses as too large is handled as above. Exactly-once: sends go through
:class:`worker.transactions.Transactions`; a failed delivery dooms the transaction instead, and a refusal
as too large lowers the topic's known limit for the records read again.
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
from worker.messages import VALUE_OMITTED_HEADER, ImageRequest, dlq_headers, encode_embedding
from worker.metrics import WorkerMetrics
from worker.offsets import OffsetTracker
from worker.transactions import Transactions
from worker.work import InputRecord, Outgoing, send

log = logging.getLogger(__name__)
_RETRY_BACKOFF_S = 1.0


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
        self.last_ack = time.monotonic()
        self._limits = dict(topic_limits or {})
        # Exactly-once: the largest record each topic refused in the open transaction.
        self._refused: dict[str, int] = {}
        self.transactions: Transactions | None = None
        if settings.exactly_once:
            timeout = settings.broker_lost_timeout_s
            self.transactions = Transactions(
                producer, consumer, timeout, self._delivered, self._transaction_send_failed, reopen
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
        self._send(
            Outgoing(record, self._settings.dlq_topic, record.key, record.value, headers, True, reason)
        )

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

    def _send(self, out: Outgoing) -> None:
        limit = self._limits.get(out.topic)
        if limit is not None and out.value is not None:
            size = record_bytes(out.key, out.value, out.headers)
            if size > limit:
                self._too_large(out, f"{size} bytes, over max.message.bytes {limit} of {out.topic}")
                return
        if self.transactions is not None:
            self.transactions.publish(out)
            return
        send(self._producer, out, self._delivered, self._send_failed)

    def _delivered(self, out: Outgoing) -> None:
        # Producer I/O thread: cheap, non-blocking bookkeeping only.
        self.last_ack = time.monotonic()
        self._tracker.ack(out.record.partition, out.record.source.offset)
        if out.is_dlq:
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
        assert out.value is not None
        # Even the dead-letter topic refuses the original bytes: keep the record (key, headers, reason,
        # source coordinates) and say how many bytes were left out, rather than stall.
        log.error("dead letter of %s is %s; sending it without its value", out.record.source, detail)
        _omit_value(out)
        self._send(out)

    def _send_failed(self, out: Outgoing, exc: BaseException) -> None:
        if isinstance(exc, MessageSizeTooLargeError) and out.value is not None:
            self._too_large(out, f"refused by the broker as too large ({exc})")
            return
        out.attempt += 1
        out.not_before = time.monotonic() + min(_RETRY_BACKOFF_S * out.attempt, 10.0)
        log.warning(
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
        log.warning(
            "delivery to %s failed for %s (%s); aborting the transaction", out.topic, out.record.source, exc
        )
        if isinstance(exc, MessageSizeTooLargeError) and out.value is not None:
            # The records of one refused batch all report the error; the largest is the one too large.
            size = record_bytes(out.key, out.value, out.headers)
            self._refused[out.topic] = max(self._refused.get(out.topic, 0), size)


def _omit_value(out: Outgoing) -> None:
    assert out.value is not None
    out.headers = [*out.headers, (VALUE_OMITTED_HEADER, str(len(out.value)).encode())]
    out.value = None
