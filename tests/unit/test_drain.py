"""Exactly-once shutdown: which aborts of the last transaction still make a clean exit.

A rebalance during the drain hands the work to the partitions' new owners, as at-least-once mode does, so
it exits cleanly; any other abort at shutdown does not. The race itself (a revocation landing while the
worker drains) is rare against a real broker, so the decision is checked here with the shared fakes: nothing
was sent.
"""

from __future__ import annotations

import pytest

from tests.support.fake_kafka import FakeConsumer, FakeProducer
from worker.config import load_settings
from worker.inference.embedder import Embedder
from worker.loop.pipeline import Pipeline
from worker.ops.health import HealthState
from worker.ops.metrics import WorkerMetrics
from worker.output.delivery import ExactlyOnce
from worker.output.delivery.transactions import AbortReason
from worker.output.offsets import OffsetTracker
from worker.output.topic_limits import TopicLimits


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
    tracker, metrics, consumer = OffsetTracker(), WorkerMetrics(), FakeConsumer()
    delivery = ExactlyOnce(FakeProducer(), consumer, tracker, metrics, TopicLimits(), timeout_s=5.0)
    pipeline = Pipeline(settings, tiny_embedder, consumer, delivery, tracker, metrics, HealthState(), 4, 1)
    delivery.transactions.doom(reason)
    assert pipeline.drain(grace_s=1.0) is clean
    assert delivery.transactions.doomed is None, "the transaction was aborted"
