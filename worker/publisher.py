"""Publishing results: embeddings to the output topic, rejected records to the DLQ, acknowledgements.

At-least-once (the default): every send is tracked until the broker acknowledges it; a failed delivery is
retried with backoff, and one refused as too large is dead-lettered (or sent to the DLQ without its
value). Exactly-once: sends go through :class:`worker.transactions.Transactions`; a failed delivery dooms
the transaction instead, and what to send differently next time is remembered here.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError, MessageSizeTooLargeError

from worker.config import Settings
from worker.errors import RejectReason
from worker.messages import VALUE_OMITTED_HEADER, ImageRequest, Source, dlq_headers, encode_embedding
from worker.metrics import WorkerMetrics
from worker.offsets import OffsetTracker
from worker.transactions import Transactions
from worker.work import InputRecord, Outgoing

log = logging.getLogger(__name__)
_RETRY_BACKOFF_S = 1.0


class _Downgrade(enum.Enum):
    DEAD_LETTER = "dead_letter"  # the output was too large for the broker
    OMIT_VALUE = "omit_value"  # even the dead letter was: send it without the original bytes


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
    ) -> None:
        self._settings = settings
        self._producer = producer
        self._tracker = tracker
        self._metrics = metrics
        self._model_label = model_label
        self._retries: deque[Outgoing] = deque()
        self._retries_lock = threading.Lock()
        self.last_ack = time.monotonic()
        # Exactly-once: records whose output (or dead letter) the broker refused as too large, and what to
        # send instead when the aborted transaction's records are processed again.
        self._downgrades: dict[Source, _Downgrade] = {}
        self.transactions: Transactions | None = None
        if settings.exactly_once:
            timeout = settings.broker_lost_timeout_s
            self.transactions = Transactions(
                producer, consumer, timeout, self._delivered, self._transaction_send_failed
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
        if record.source in self._downgrades:
            message = "output record rejected by the broker as too large"
            self.dead_letter(record, RejectReason.OUTPUT_TOO_LARGE, message)
            return
        key = record.key if record.key is not None else request.id.encode()
        self._send(Outgoing(record, self._settings.output_topic, key, value, record.headers, is_dlq=False))

    def dead_letter(self, record: InputRecord, reason: RejectReason, message: str) -> None:
        """Send ``record`` unchanged to the DLQ with the error headers."""
        log.debug("dead-letter %s: %s", record.source, message)
        headers = dlq_headers(record.headers, reason, message, record.source)
        out = Outgoing(record, self._settings.dlq_topic, record.key, record.value, headers, True, reason)
        if self._downgrades.get(record.source) is _Downgrade.OMIT_VALUE:
            _omit_value(out)
        self._send(out)

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
    def retrying(self) -> bool:
        """Some deliveries wait for their retry."""
        with self._retries_lock:
            return bool(self._retries)

    def forget_downgrades(self) -> None:
        """The transaction holding the downgraded records was committed: they are never processed again."""
        self._downgrades.clear()

    def _send(self, out: Outgoing) -> None:
        if self.transactions is not None:
            self.transactions.publish(out)
            return
        try:
            future = self._producer.send(out.topic, key=out.key, value=out.value, headers=out.headers)
        except KafkaError as exc:
            self._send_failed(out, exc)
            return
        future.add_callback(lambda _metadata: self._delivered(out))
        future.add_errback(lambda exc: self._send_failed(out, exc))

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

    def _send_failed(self, out: Outgoing, exc: BaseException) -> None:
        if isinstance(exc, MessageSizeTooLargeError):
            if not out.is_dlq:
                message = f"output record rejected by the broker as too large: {exc}"
                self.dead_letter(out.record, RejectReason.OUTPUT_TOO_LARGE, message)
                return
            if out.value is not None:
                # Even the dead-letter topic refuses the original bytes: keep the record (key, headers,
                # reason, source coordinates) and say how many bytes were left out, rather than stall.
                log.error(
                    "DLQ refused %d bytes from %s; sending it without its value",
                    len(out.value),
                    out.record.source,
                )
                _omit_value(out)
                self._send(out)
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
        if isinstance(exc, MessageSizeTooLargeError):
            downgrade = _Downgrade.OMIT_VALUE if out.is_dlq else _Downgrade.DEAD_LETTER
            self._downgrades[out.record.source] = downgrade


def _omit_value(out: Outgoing) -> None:
    assert out.value is not None
    out.headers = [*out.headers, (VALUE_OMITTED_HEADER, str(len(out.value)).encode())]
    out.value = None
