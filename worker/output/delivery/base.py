"""What the pipeline and the publisher need of a delivery guarantee, and what it reports back."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable
from typing import Any, Protocol

from worker.kafka_io import Producer
from worker.kafka_io.errors import KafkaLayerError
from worker.output.delivery.transactions import AbortReason
from worker.work import BrokerWatch, Outgoing


class DrainOutcome(enum.Enum):
    """How the last commit at shutdown went."""

    COMMITTED = "committed"  # what was acknowledged is committed; what was not is re-read by the next owner
    HANDED_OVER = "handed_over"  # a rebalance took the partitions: their new owners read the work again
    ABORTED = "aborted"  # the work since the last commit was given up for another reason


class Outcomes(Protocol):
    """Where a delivery reports what became of each record it was given (the publisher)."""

    def delivered(self, out: Outgoing) -> None:
        """The broker acknowledged it (or it was skipped as undeliverable); on the producer's I/O thread."""

    def failed(self, out: Outgoing, exc: BaseException) -> None:
        """A delivery failed; it will be retried (or its transaction aborted)."""

    def too_large(self, out: Outgoing, detail: str) -> None:
        """The broker refused it as too large: the publisher sends a smaller stand-in instead."""

    def unsendable(self, out: Outgoing, exc: BaseException) -> None:
        """The client refused the record itself: retrying cannot help."""


class Delivery(Protocol):
    """A delivery guarantee: how results are sent, acknowledged and committed."""

    watch: BrokerWatch

    @property
    def producer(self) -> Producer:
        """The producer in use."""

    def start(self) -> None:
        """Prepare the producer before the consumer joins the group."""

    def admit(self, partition: Any, offset: int) -> bool:
        """A record was polled; False if it must be ignored (already read in this epoch)."""

    @property
    def epoch(self) -> int:
        """Results of records polled in an older epoch are dropped (see :meth:`abort`)."""

    def send(self, out: Outgoing, outcomes: Outcomes) -> None:
        """Send ``out``; its outcome is reported to ``outcomes``."""

    def resend_due(self) -> None:
        """Send again the failed deliveries whose backoff has passed."""

    @property
    def retrying(self) -> bool:
        """Some deliveries wait for their retry."""

    @property
    def must_rewind(self) -> bool:
        """The work since the last commit must be aborted and read again (see :meth:`abort`)."""

    def partitions_revoked(self) -> None:
        """The group took partitions away; on the consumer's I/O thread, so it must not block."""

    def commit(self) -> bool:
        """Commit the acknowledged work; False if it must be aborted and read again instead."""

    def abort(self) -> AbortReason:
        """Abort the work since the last commit and start a new epoch; says why."""

    def final_commit(self) -> DrainOutcome:
        """The last commit at shutdown."""

    def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the sends in flight."""

    def close(self, timeout: float) -> None:
        """Close the producer."""


def quietly(call: Callable[[], None]) -> None:
    """Run a producer call whose failure the caller learns otherwise (an errback, the exit code)."""
    with contextlib.suppress(KafkaLayerError):
        call()
