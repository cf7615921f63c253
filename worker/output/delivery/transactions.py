"""Exactly-once mode: results published in a Kafka transaction together with the consumed offsets.

One transaction is open at a time. Results enter it in poll order per partition (see
:mod:`worker.output.delivery.ordering`); every ``--commit-interval-ms`` the main loop flushes it, adds the
consumed offsets (which then cover exactly the records whose results it holds) and commits. Anything that
breaks that correspondence dooms the transaction: a rebalance (kafka-python calls the rebalance listener
on its I/O thread, where nothing may block, so the listener only marks the doom), a failed delivery, a
failed commit.
The main loop then aborts it and reads every partition again from its committed offset, so a
read_committed consumer sees each result exactly once.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from worker.config import Settings
from worker.errors import BrokerLostError, TransactionFencedError
from worker.kafka_io import Consumer, Producer, TopicPartition
from worker.kafka_io.errors import (
    KafkaLayerError,
    ProducerFencedError,
    TransactionsRefusedError,
    UnsendableRecordError,
)
from worker.output.delivery.ordering import InOrderRelease, OutOfOrderError
from worker.work import BrokerWatch, Outgoing, send

log = logging.getLogger(__name__)
T = TypeVar("T")

_FATAL = (ProducerFencedError, TransactionsRefusedError)


class AbortReason(enum.StrEnum):
    """Why a transaction was aborted (the ``reason`` label of the abort counter)."""

    REBALANCE = "rebalance"
    DELIVERY_FAILED = "delivery_failed"
    COMMIT_FAILED = "commit_failed"
    INCONSISTENT = "inconsistent"
    PRODUCER_STUCK = "producer_stuck"


# A transactional call normally ends within a second; one that has not after this long (the broker being
# up) is stuck in kafka-python: seen after broker restarts, where its sender kept waiting for a connection
# that never came back. The worker then replaces the producer (see Transactions._replace_producer). At
# 30 s a broker restart cost 24 s of stall in four runs of six; a spurious replacement only aborts and
# re-reads one commit interval, so the wait is kept short.
STUCK_AFTER_S = 15.0


class _StuckError(Exception):
    """A transactional producer call did not return in time."""


def transactional_id(settings: Settings) -> str:
    """The producer's transactional id: stable across restarts of the same worker, unique among live ones.

    With static membership the instance id is both; otherwise the host name and process id (pid 1 in a
    container, so a restarted pod fences its previous incarnation at once).
    """
    if settings.transactional_id:
        return settings.transactional_id
    if settings.group_instance_id:
        return f"clip-worker.{settings.group_id}.{settings.group_instance_id}"
    return f"clip-worker.{settings.group_id}.{socket.gethostname()}.{os.getpid()}"


class Transactions:
    """The open transaction: in-order sends, commit with the consumed offsets, abort.

    ``publish`` runs on the inference and main threads, delivery callbacks on the producer's I/O thread,
    ``doom`` on the consumer's I/O thread; ``commit`` and ``abort`` on the main loop only.
    """

    def __init__(
        self,
        producer: Producer,
        consumer: Consumer,
        timeout_s: float,
        on_delivered: Callable[[Outgoing], None],
        on_failed: Callable[[Outgoing, BaseException], None],
        reopen: Callable[[], Producer] | None = None,
        watch: BrokerWatch | None = None,
        stuck_after_s: float = STUCK_AFTER_S,
    ) -> None:
        self._producer = producer
        self._watch = watch or BrokerWatch()
        self._reopen = reopen
        self._stuck_after_s = min(timeout_s, stuck_after_s)
        self._consumer = consumer
        self._timeout_s = timeout_s
        self._on_delivered = on_delivered
        self._on_failed = on_failed
        self._lock = threading.Lock()
        self._order: InOrderRelease[Outgoing] = InOrderRelease()
        self._open = False
        self._doom: AbortReason | None = None
        self.epoch = 0

    @property
    def producer(self) -> Producer:
        """The producer in use (a stuck one is replaced)."""
        return self._producer

    def start(self) -> None:
        """Register the transactional id; this aborts whatever a previous incarnation left open."""
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                self._producer.init_transactions()  # bounded by the producer's max_block_ms
                return
            except _FATAL as exc:
                raise _fenced(exc) from None
            except KafkaLayerError as exc:
                if time.monotonic() >= deadline:
                    raise BrokerLostError(
                        f"the broker did not initialise transactions within {self._timeout_s:.0f}s ({exc}); "
                        "check that it supports transactions, or raise --broker-lost-timeout-s"
                    ) from None
                log.warning("initialising transactions failed (%s); retrying", exc)
                time.sleep(1.0)

    @property
    def doomed(self) -> AbortReason | None:
        """Why the open transaction must be aborted, or None."""
        return self._doom

    def doom(self, reason: AbortReason) -> None:
        """Mark the open transaction for abort; safe from any thread, never blocks."""
        if self._doom is None:
            self._doom = reason

    def expect(self, tp: TopicPartition, offset: int) -> bool:
        """A record was polled; its result will be sent after those polled before it."""
        with self._lock:
            return self._order.expect(tp, offset)

    def publish(self, out: Outgoing) -> None:
        """Send ``out`` within the open transaction once every earlier record of its partition is sent."""
        with self._lock:
            if out.record.epoch != self.epoch:
                return  # polled before the last abort: that record is being read again
            try:
                due = self._order.ready(out.record.partition, out.record.source.offset, out)
            except OutOfOrderError as exc:
                log.error("%s; aborting the transaction", exc)
                self.doom(AbortReason.INCONSISTENT)
                return
            for item in due:
                self._send(item)

    def _send(self, out: Outgoing) -> None:
        if out.undeliverable is not None:
            self._delivered(out)  # skipped by policy: it only had to take its turn
            return
        if not self._open:
            try:
                self._producer.begin_transaction()
            except KafkaLayerError as exc:
                self._failed(out, exc)
                return
            self._open = True
        send(self._producer, out, self._delivered, self._failed, self._watch)

    def _delivered(self, out: Outgoing) -> None:
        if out.record.epoch == self.epoch:  # acknowledgements of an aborted epoch count for nothing
            self._on_delivered(out)

    def _failed(self, out: Outgoing, exc: BaseException) -> None:
        if out.record.epoch == self.epoch:
            self._on_failed(out, exc)
            if not isinstance(exc, UnsendableRecordError):  # never sent: the transaction is unharmed
                self.doom(AbortReason.DELIVERY_FAILED)

    def commit(
        self, acknowledged: Callable[[], dict[TopicPartition, int]]
    ) -> dict[TopicPartition, int] | None:
        """Commit the open transaction with the consumed offsets it covers.

        ``acknowledged`` gives, per partition, the offset after the last contiguously acknowledged record.
        Returns the offsets committed ({} when nothing was sent), or None when the transaction must be
        aborted instead (see :attr:`doomed`).
        """
        with self._lock:
            if self._doom is not None:
                return None
            if not self._open:
                return {}
            try:
                self._producer.flush(timeout=self._stuck_after_s)
            except KafkaLayerError:
                self.doom(AbortReason.DELIVERY_FAILED)
            if self._doom is not None:
                return None
            offsets = acknowledged()
            released = {tp: offset + 1 for tp, offset in self._order.released_since_mark().items()}
            if any(offsets.get(tp) != offset for tp, offset in released.items()):
                # Every result sent was acknowledged, so each partition's offset must sit right after its
                # last released record; anything else would commit offsets that do not match the outputs.
                log.error("transaction offsets %s do not match the results sent %s", offsets, released)
                self.doom(AbortReason.INCONSISTENT)
                return None
            committed = {tp: offsets[tp] for tp in released}
            group = self._consumer.group_metadata()
            try:
                if committed:
                    self._bounded(
                        lambda: self._producer.send_offsets_to_transaction(committed, group),
                        "add the consumed offsets to the transaction",
                    )
                self._bounded(self._producer.commit_transaction, "commit the transaction")
            except _FATAL as exc:
                raise _fenced(exc) from None
            except _StuckError as stuck:
                self._replace_producer(str(stuck))
                self.doom(AbortReason.PRODUCER_STUCK)
                return None
            except KafkaLayerError as exc:
                log.warning("transaction commit failed (%s); aborting it", exc)
                self.doom(AbortReason.COMMIT_FAILED)
                return None
            self._open = False
            self._order.mark()
            return committed

    def abort(self) -> AbortReason:
        """Abort the open transaction and start a new epoch; results of older epochs are dropped."""
        with self._lock:
            reason = self._doom or AbortReason.INCONSISTENT
            self.epoch += 1
            self._order.clear()
            if self._open:
                with contextlib.suppress(KafkaLayerError):  # failures of the aborted records do not matter
                    self._producer.flush(timeout=self._stuck_after_s)
                try:
                    self._bounded(self._producer.abort_transaction, "abort the transaction")
                except _FATAL as exc:
                    raise _fenced(exc) from None
                except _StuckError as stuck:
                    self._replace_producer(str(stuck))
                self._open = False
            self._doom = None
            return reason

    def _replace_producer(self, what: str) -> None:
        """Close a stuck producer and register a new one under the same transactional id.

        Registering fences the old producer and makes the broker abort its open transaction, so nothing it
        sent becomes visible. If the broker is really gone, registering fails past the broker-lost deadline
        and the worker exits.
        """
        if self._reopen is None:
            raise BrokerLostError(f"the producer could not {what}; exiting")
        log.warning("the producer could not %s within %.0fs; replacing it", what, self._stuck_after_s)
        stuck = self._producer
        threading.Thread(target=_close_quietly, args=(stuck,), name="close-stuck", daemon=True).start()
        self._producer = self._reopen()
        self._open = False
        self.start()

    def _bounded(self, call: Callable[[], T], what: str) -> T:
        """Run a blocking producer call on a helper thread; raise :class:`_StuckError` if it hangs.

        kafka-python waits without limit for a transaction to end, so a stuck call would hang the worker.
        """
        result: list[T] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                result.append(call())
            except BaseException as exc:
                error.append(exc)

        helper = threading.Thread(target=run, name="transaction", daemon=True)
        helper.start()
        helper.join(self._stuck_after_s)
        if helper.is_alive():
            raise _StuckError(what)
        if error:
            raise error[0]
        return result[0]


def _close_quietly(producer: Producer) -> None:
    with contextlib.suppress(Exception):
        producer.close(timeout=1)


def _fenced(exc: BaseException) -> TransactionFencedError:
    if isinstance(exc, ProducerFencedError):
        return TransactionFencedError(
            "another worker took over this transactional id; give every worker its own --transactional-id "
            "(or --group-instance-id)"
        )
    return TransactionFencedError(f"the broker refused transactions ({exc}); check its ACLs")
