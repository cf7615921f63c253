"""Exactly-once shutdown: which aborts of the last transaction still make a clean exit.

A rebalance during the drain hands the work to the partitions' new owners, as at-least-once mode does, so
it exits cleanly; any other abort at shutdown does not. The race itself (a revocation landing while the
worker drains) is rare against a real broker, so the decision is checked here with stand-ins that record
nothing was sent.
"""

from __future__ import annotations

import pytest

from worker.config import load_settings
from worker.embedder import Embedder
from worker.metrics import HealthState, WorkerMetrics
from worker.pipeline import Pipeline
from worker.transactions import AbortReason


class IdleProducer:
    """Nothing was sent in the open transaction: the drain only flushes."""

    def flush(self, timeout: float | None = None) -> None:
        pass


class IdleConsumer:
    def group_metadata(self) -> str:
        return "group"


@pytest.mark.parametrize(
    ("reason", "clean"),
    [
        (AbortReason.REBALANCE, True),
        (AbortReason.DELIVERY_FAILED, False),
        (AbortReason.COMMIT_FAILED, False),
        (AbortReason.PRODUCER_STUCK, False),
    ],
)
def test_the_last_transaction_aborted_at_shutdown(tiny_embedder: Embedder, reason: AbortReason, clean: bool):
    settings = load_settings({"exactly_once": True, "transactional_id": "drain", "device": "cpu"}, environ={})
    pipeline = Pipeline(
        settings, tiny_embedder, IdleConsumer(), IdleProducer(), WorkerMetrics(), HealthState(), batch_size=4
    )
    assert pipeline.publisher.transactions is not None
    pipeline.publisher.transactions.doom(reason)
    assert pipeline.drain(grace_s=1.0) is clean
    assert pipeline.publisher.transactions.doomed is None, "the transaction was aborted"
