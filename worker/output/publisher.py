"""Publishing results: embeddings to the output topic, rejected records to the DLQ.

The publisher decides *what* is sent for each record, the delivery guarantee (:mod:`worker.output.delivery`)
*how*. Every record is checked against its topic's ``max.message.bytes`` before it is sent: an output too
large is dead-lettered (``output_too_large``), and a dead letter too large is cut down step by step (see
:func:`_shrink`). A dead letter that cannot be delivered even then, or that the client refuses outright, is
*undeliverable*: logged with its coordinates, counted, and acknowledged so that its partition moves on.
That is the one case where a record leaves no trace in Kafka, and it takes a record the DLQ topic cannot
hold even without its value, headers and key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np

from worker.config import Settings
from worker.errors import RejectedRecord, RejectReason
from worker.messages import (
    DLQ_HEADERS,
    HEADERS_OMITTED_HEADER,
    KEY_TRUNCATED_HEADER,
    NULL_VALUE_HEADER,
    VALUE_OMITTED_HEADER,
    Request,
    dlq_headers,
    encode_embedding,
)
from worker.ops.metrics import WorkerMetrics
from worker.output.delivery import Delivery
from worker.output.offsets import OffsetTracker
from worker.output.topic_limits import TopicLimits
from worker.work import InputRecord, Outgoing

log = logging.getLogger(__name__)
# A dead letter's key is cut to this many bytes when nothing else makes it fit its topic.
TRUNCATED_KEY_BYTES = 256
# After this long with deliveries failing (or unanswered) and none succeeding, the worker is not ready.
FAILING_AFTER_S = 5.0
UNANSWERED_AFTER_S = 15.0


class Publisher:
    """Sends each record's one result and turns acknowledgements into committable offsets.

    ``embedding`` and ``dead_letter`` run on the main and inference threads; the outcome callbacks
    (:class:`worker.output.delivery.Outcomes`) on the producer's I/O thread, touching thread-safe state only.
    """

    def __init__(
        self,
        settings: Settings,
        delivery: Delivery,
        tracker: OffsetTracker,
        metrics: WorkerMetrics,
        model_label: str,
        limits: TopicLimits | None = None,
    ) -> None:
        self._settings = settings
        self.delivery = delivery
        self._tracker = tracker
        self._metrics = metrics
        self._model_label = model_label
        self._limits = limits or TopicLimits()
        self._failing_since: float | None = None
        self._last_failure = ""

    def embedding(
        self,
        record: InputRecord,
        request: Request,
        vector: np.ndarray,
        scores: Mapping[str, float] | None = None,
        fetched: bytes | None = None,
    ) -> None:
        """Publish the embedding of ``record`` with its ``scores`` (dead-lettered instead if it is too large
        to send), to the output topic or, when its nsfw score is over ``--route-nsfw-above``, the NSFW one.
        ``fetched``: the image a ``uri`` request was fetched as, for ``--forward-image``."""
        value = encode_embedding(
            request,
            vector,
            self._model_label,
            record.source,
            self._settings.forward_image,
            self._settings.output_dtype,
            scores,
            fetched,
        )
        if len(value) > self._settings.max_message_bytes:
            message = f"output record is {len(value)} bytes, over --max-message-bytes"
            self.dead_letter(record, RejectReason.OUTPUT_TOO_LARGE, message)
            return
        key = record.key if record.key is not None else request.id.encode()
        topic = output_topic(self._settings, scores)
        self._send(Outgoing(record, topic, key, value, record.headers, is_dlq=False))

    def reject(self, record: InputRecord, rejection: RejectedRecord) -> None:
        """Dead-letter ``record`` for the reason ``rejection`` gives."""
        self.dead_letter(record, rejection.reason, rejection.message)

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

    @property
    def failing(self) -> str | None:
        """Why deliveries have been failing, or unanswered, for a while, or None if they are not."""
        since = self._failing_since
        if since is not None and time.monotonic() - since >= FAILING_AFTER_S:
            return self._last_failure
        silent = self.delivery.watch.silent_for()
        if silent >= UNANSWERED_AFTER_S:
            # kafka-python retries a send to a deleted topic on its own until its delivery timeout (2 min)
            # without a word: the silence is the first sign.
            topics = " and ".join(repr(topic) for _, topic in self._settings.output_topics())
            return (
                f"no result acknowledged by the broker for {silent:.0f}s; check that the topics "
                f"{topics} exist and the broker is up"
            )
        return None

    def _send(self, out: Outgoing) -> None:
        if out.undeliverable is None:
            detail = self._limits.too_large(out)
            if detail is not None:
                self.too_large(out, detail)
                return
        self.delivery.send(out, self)

    # ------------------------------------------------------- outcomes (worker.output.delivery.Outcomes)
    def delivered(self, out: Outgoing) -> None:
        """The broker acknowledged ``out`` (or it was skipped as undeliverable): its record is done."""
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
            if out.topic == self._settings.nsfw_output_topic:
                self._metrics.nsfw_routed.inc()
            if out.record.timestamp_ms > 0:
                self._metrics.end_to_end_seconds.observe(
                    max(0.0, time.time() - out.record.timestamp_ms / 1000)
                )

    def failed(self, out: Outgoing, exc: BaseException) -> None:
        """A delivery failed (it is retried, or its transaction aborted): count it, and after a while of
        nothing but failures, report the worker not ready."""
        self._metrics.publish_failures.labels("dlq" if out.is_dlq else "output", _error_name(exc)).inc()
        self._last_failure = f"deliveries to {out.topic} are failing: {exc}"
        if self._failing_since is None:
            self._failing_since = time.monotonic()

    def too_large(self, out: Outgoing, detail: str) -> None:
        """``out`` is too large for its topic: an output is dead-lettered, a dead letter cut down."""
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

    def unsendable(self, out: Outgoing, exc: BaseException) -> None:
        """The client refused ``out`` itself. Only a dead letter can get here (outputs always have a key
        and a value); retrying the same record would fail the same way, so it is skipped."""
        out.undeliverable = f"the Kafka client refused it: {exc}"
        self.delivered(out)


def _error_name(exc: BaseException) -> str:
    cause = exc.__cause__
    return type(cause if cause is not None else exc).__name__


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


def output_topic(settings: Settings, scores: Mapping[str, float] | None) -> str:
    """The topic of an output with these scores: ``--nsfw-topic`` when its nsfw score is above
    ``--route-nsfw-above``, else ``--output-topic``."""
    threshold, routed = settings.route_nsfw_above, settings.nsfw_output_topic
    if threshold is not None and routed is not None and scores is not None and scores["nsfw"] > threshold:
        return routed
    return settings.output_topic
