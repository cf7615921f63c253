"""At-least-once delivery (the default): each result is sent on its own, retried until the broker
acknowledges it, and offsets are committed up to the first record not yet acknowledged.

A crash re-reads what was not committed: a duplicate at worst, never a loss.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import ClassVar

from worker.config import Settings
from worker.kafka_io import Consumer, Producer, TopicPartition, open_producer
from worker.kafka_io.errors import (
    InstanceFencedError,
    KafkaLayerError,
    RecordTooLargeError,
    UnsendableRecordError,
)
from worker.ops.metrics import WorkerMetrics
from worker.output.delivery.base import DrainOutcome, Outcomes, quietly
from worker.output.delivery.transactions import AbortReason
from worker.output.offsets import OffsetTracker
from worker.output.topic_limits import TopicLimits
from worker.work import BrokerWatch, Outgoing, send

log = logging.getLogger(__name__)
RETRY_BACKOFF_S = 1.0
_COMMIT_TIMEOUT_MS = 5000  # a commit against a lost broker must not stall the poll loop


class AtLeastOnce:
    """Sends results one by one and commits what the broker acknowledged."""

    reads_committed: ClassVar[bool] = False

    @classmethod
    def open(
        cls,
        settings: Settings,
        consumer: Consumer,
        tracker: OffsetTracker,
        metrics: WorkerMetrics,
        limits: TopicLimits,
    ) -> AtLeastOnce:
        """The delivery for these settings, with its producer open."""
        return cls(open_producer(settings, None, limits.smallest), consumer, tracker, metrics)

    def __init__(
        self, producer: Producer, consumer: Consumer, tracker: OffsetTracker, metrics: WorkerMetrics
    ) -> None:
        self.producer = producer
        self._consumer = consumer
        self._tracker = tracker
        self._metrics = metrics
        self._retries: deque[tuple[Outgoing, Outcomes]] = deque()
        self._retries_lock = threading.Lock()
        self.watch = BrokerWatch()

    def start(self) -> None:
        """Nothing to prepare."""

    def admit(self, partition: TopicPartition, offset: int) -> bool:
        """Every polled record is processed."""
        return True

    @property
    def epoch(self) -> int:
        """Always 0: nothing is ever aborted."""
        return 0

    def send(self, out: Outgoing, outcomes: Outcomes) -> None:
        """Send ``out``; a failed delivery is retried with backoff (see :meth:`resend_due`)."""
        if out.undeliverable is not None:
            outcomes.delivered(out)
            return
        send(
            self.producer, out, outcomes.delivered, lambda o, exc: self._failed(o, exc, outcomes), self.watch
        )

    def _failed(self, out: Outgoing, exc: BaseException, outcomes: Outcomes) -> None:
        # Producer I/O thread: cheap bookkeeping only.
        if isinstance(exc, RecordTooLargeError):
            outcomes.too_large(out, f"refused by the broker as too large ({exc})")
            return
        if isinstance(exc, UnsendableRecordError):
            outcomes.unsendable(out, exc)
            return
        outcomes.failed(out, exc)
        out.attempt += 1
        out.not_before = time.monotonic() + min(RETRY_BACKOFF_S * out.attempt, 10.0)
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
            self._retries.append((out, outcomes))

    def resend_due(self) -> None:
        """Re-send the failed deliveries whose backoff has passed."""
        now = time.monotonic()
        with self._retries_lock:
            due = [item for item in self._retries if item[0].not_before <= now]
            if not due:
                return
            self._retries = deque(item for item in self._retries if item[0].not_before > now)
        for out, outcomes in due:
            self._metrics.publish_retries.inc()
            self.send(out, outcomes)

    @property
    def retrying(self) -> bool:
        """Some deliveries wait for their retry."""
        with self._retries_lock:
            return bool(self._retries)

    @property
    def must_rewind(self) -> bool:
        """Never: results are final once acknowledged."""
        return False

    def partitions_revoked(self) -> None:
        """Nothing to do: revoked partitions are dropped by the offset tracker, never committed by us."""

    def commit(self) -> bool:
        """Commit every partition's position up to its first unacknowledged record (a failed commit is
        retried with the next one)."""
        offsets = self._tracker.committable()
        if not offsets:
            return True
        try:
            self._consumer.commit(offsets, timeout_ms=_COMMIT_TIMEOUT_MS)
        except InstanceFencedError:
            raise
        except KafkaLayerError as exc:
            self._metrics.commit_failures.inc()
            log.warning("offset commit failed (%s); will retry with the next commit", exc)
            return True
        self._tracker.mark_committed(offsets)
        self._metrics.commits.inc()
        return True

    def abort(self) -> AbortReason:
        """Never called: :attr:`must_rewind` is never set and :meth:`commit` never asks for it."""
        raise RuntimeError("at-least-once delivery has nothing to abort")

    def final_commit(self) -> DrainOutcome:
        """Commit what was acknowledged; the rest is read again by the next owner."""
        self.commit()
        return DrainOutcome.COMMITTED

    def flush(self, timeout: float) -> None:
        """Wait for the sends in flight; a failed one comes back through its errback."""
        quietly(lambda: self.producer.flush(timeout=timeout))

    def close(self, timeout: float) -> None:
        """Close the producer (quietly: with the broker gone it times out)."""
        quietly(lambda: self.producer.close(timeout=timeout))
