"""Exactly-once delivery (``--exactly-once``): results and consumed offsets in Kafka transactions.

The transaction bookkeeping is :class:`worker.output.delivery.transactions.Transactions`; this class is
what the pipeline sees of it. A read_committed consumer of the outputs sees each result exactly once.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from worker.config import Settings
from worker.kafka_io import Consumer, Producer, TopicPartition, open_producer
from worker.kafka_io.errors import RecordTooLargeError, UnsendableRecordError
from worker.ops.metrics import WorkerMetrics
from worker.output.delivery.base import DrainOutcome, Outcomes, quietly
from worker.output.delivery.transactions import AbortReason, Transactions, transactional_id
from worker.output.offsets import OffsetTracker
from worker.output.topic_limits import TopicLimits
from worker.work import BrokerWatch, Outgoing

log = logging.getLogger(__name__)


class ExactlyOnce:
    """Publishes results in transactions with the offsets they cover; aborts and re-reads on trouble."""

    # Skips records of aborted upstream transactions, and makes a new owner of a partition wait for the
    # offsets of a transaction still being committed (KIP-447) instead of reading stale ones.
    reads_committed: ClassVar[bool] = True

    @classmethod
    def open(
        cls,
        settings: Settings,
        consumer: Consumer,
        tracker: OffsetTracker,
        metrics: WorkerMetrics,
        limits: TopicLimits,
    ) -> ExactlyOnce:
        """The delivery for these settings, with its transactional producer open."""
        txn_id = transactional_id(settings)
        log.info("exactly-once mode: transactional id %s, read_committed input", txn_id)

        def reopen() -> Producer:
            return open_producer(settings, txn_id, limits.smallest)

        return cls(reopen(), consumer, tracker, metrics, limits, settings.broker_lost_timeout_s, reopen)

    def __init__(
        self,
        producer: Producer,
        consumer: Consumer,
        tracker: OffsetTracker,
        metrics: WorkerMetrics,
        limits: TopicLimits,
        timeout_s: float,
        reopen: Any = None,
    ) -> None:
        self._tracker = tracker
        self._metrics = metrics
        self._limits = limits
        self.watch = BrokerWatch()
        self._outcomes: Outcomes | None = None
        self.transactions = Transactions(
            producer, consumer, timeout_s, self._delivered, self._failed, reopen, self.watch
        )

    @property
    def producer(self) -> Producer:
        """The producer in use (a stuck one is replaced)."""
        return self.transactions.producer

    def start(self) -> None:
        """Register the transactional id (this aborts what a previous incarnation left open)."""
        self.transactions.start()

    def admit(self, partition: TopicPartition, offset: int) -> bool:
        """False for a record already read in this epoch (re-delivered after a seek)."""
        return self.transactions.expect(partition, offset)

    @property
    def epoch(self) -> int:
        """Counts aborts: results of records polled before the last one are dropped."""
        return self.transactions.epoch

    def send(self, out: Outgoing, outcomes: Outcomes) -> None:
        """Send ``out`` in the open transaction, after the results of the records polled before it."""
        self._outcomes = outcomes  # always the same publisher; the callbacks below report to it
        self.transactions.publish(out)

    def _delivered(self, out: Outgoing) -> None:
        assert self._outcomes is not None
        self._outcomes.delivered(out)

    def _failed(self, out: Outgoing, exc: BaseException) -> None:
        # Producer I/O thread. The transaction is doomed (unless the record was never sent); remember
        # what to send instead next time.
        assert self._outcomes is not None
        if isinstance(exc, UnsendableRecordError):
            self._outcomes.unsendable(out, exc)
            return
        self._outcomes.failed(out, exc)
        log.warning(
            "delivery to %s failed for %s (%s); aborting the transaction", out.topic, out.record.source, exc
        )
        if isinstance(exc, RecordTooLargeError):
            self._limits.refused(out)

    def resend_due(self) -> None:
        """Nothing is re-sent on its own: a failed delivery aborts the transaction."""

    @property
    def retrying(self) -> bool:
        """Never: see :meth:`resend_due`."""
        return False

    @property
    def must_rewind(self) -> bool:
        """The open transaction is doomed."""
        return self.transactions.doomed is not None

    def partitions_revoked(self) -> None:
        """The open transaction may hold results of the revoked partitions: doom it (never blocks)."""
        self.transactions.doom(AbortReason.REBALANCE)

    def commit(self) -> bool:
        """Commit the open transaction with its offsets; False if it must be aborted instead."""
        committed = self.transactions.commit(self._tracker.committable)
        if committed is None:
            return False
        if committed:
            self._tracker.mark_committed(committed)
            self._metrics.commits.inc()
        return True

    def abort(self) -> AbortReason:
        """Abort the open transaction; records larger than those refused in it now count as too large."""
        reason = self.transactions.abort()
        self._limits.apply_refusals()
        # The aborted sends will not be retried (their records are read again and sent anew): a send that
        # timed out before the abort must not count as the broker's silence from now on.
        self.watch.reset()
        return reason

    def final_commit(self) -> DrainOutcome:
        """Commit the last transaction, or abort it: its records stay uncommitted for the next owner."""
        if self.commit():
            return DrainOutcome.COMMITTED
        reason = self.transactions.abort()
        if reason is AbortReason.REBALANCE:
            # As in at-least-once mode, where records of partitions revoked during the drain are left to
            # their new owner: the group moved work while this worker left, which is no failure.
            log.warning("shutdown: a rebalance aborted the last transaction; new owners read it again")
            return DrainOutcome.HANDED_OVER
        log.error("shutdown: the last transaction was aborted (%s); it will be read again", reason.value)
        return DrainOutcome.ABORTED

    def flush(self, timeout: float) -> None:
        """Wait for the sends in flight; a failed one comes back through its errback."""
        quietly(lambda: self.producer.flush(timeout=timeout))

    def close(self, timeout: float) -> None:
        """Close the producer (quietly: with the broker gone it times out)."""
        quietly(lambda: self.producer.close(timeout=timeout))
