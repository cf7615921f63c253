"""What each topic accepts: ``max.message.bytes`` as read at start-up, lowered by the broker's refusals."""

from __future__ import annotations

import logging
import threading

from worker.kafka_io import record_bytes
from worker.work import Outgoing

log = logging.getLogger(__name__)


class TopicLimits:
    """Record size limits per topic, checked before every send."""

    def __init__(self, limits: dict[str, int] | None = None) -> None:
        self._limits = dict(limits or {})
        self._refused: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def smallest(self) -> int | None:
        """The lowest limit known (producer batches stay under it)."""
        return min(self._limits.values(), default=None)

    def too_large(self, out: Outgoing) -> str | None:
        """Why ``out`` is too large for its topic, or None if it fits (or the limit is unknown)."""
        limit = self._limits.get(out.topic)
        if limit is None:
            return None
        size = record_bytes(out.key, out.value, out.headers)
        if size <= limit:
            return None
        return f"{size} bytes, over max.message.bytes {limit} of {out.topic}"

    def refused(self, out: Outgoing) -> None:
        """The broker refused ``out`` as too large (producer I/O thread). The records of one refused batch
        all report it, so the largest of them is taken as the one too large."""
        size = record_bytes(out.key, out.value, out.headers)
        with self._lock:
            self._refused[out.topic] = max(self._refused.get(out.topic, 0), size)

    def apply_refusals(self) -> None:
        """From now on, records as large as a refused one are handled as too large."""
        with self._lock:
            refused, self._refused = self._refused, {}
        for topic, size in refused.items():
            self._limits[topic] = min(self._limits.get(topic, size), size - 1)
            log.warning(
                "%s refused a record of %d bytes; larger ones are now handled as too large", topic, size
            )
