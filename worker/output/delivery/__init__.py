"""The delivery guarantee: one interface, two implementations, chosen once at start-up.

- :class:`worker.output.delivery.at_least_once.AtLeastOnce` (the default): each result is sent on its own
  and retried until the broker acknowledges it; acknowledged offsets are committed with the consumer.
- :class:`worker.output.delivery.exactly_once.ExactlyOnce` (``--exactly-once``): results and consumed
  offsets are committed together in Kafka transactions; anything that breaks a transaction aborts it and
  the input is read again from the committed offsets.

Nothing else in the worker knows which one runs: the pipeline, the publisher and the inference stage speak
only to :class:`Delivery`.
"""

from __future__ import annotations

from worker.config import Settings
from worker.output.delivery.at_least_once import AtLeastOnce
from worker.output.delivery.base import Delivery, DrainOutcome, Outcomes
from worker.output.delivery.exactly_once import ExactlyOnce

__all__ = ["AtLeastOnce", "Delivery", "DrainOutcome", "ExactlyOnce", "Outcomes", "choose"]


def choose(settings: Settings) -> type[AtLeastOnce] | type[ExactlyOnce]:
    """The delivery guarantee the settings ask for: whether its input is read committed, and its ``open``."""
    return ExactlyOnce if settings.exactly_once else AtLeastOnce
