"""Size-or-deadline batching, pure: no Kafka, no torch, and an injectable clock for tests."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class CloseCause(enum.StrEnum):
    """Why a batch closed; a metric label."""

    SIZE = "size"
    TIMEOUT = "timeout"
    DRAIN = "drain"


@dataclass(frozen=True)
class Batch(Generic[T]):
    """A closed batch and why it closed."""

    items: list[T]
    cause: CloseCause


class Batcher(Generic[T]):
    """Accumulates items; a batch closes at ``max_size`` items or once its oldest waited ``max_wait_s``."""

    def __init__(self, max_size: int, max_wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._items: list[T] = []
        self._oldest_at = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> Batch[T] | None:
        """Add one item; returns the batch it completed, if any."""
        if not self._items:
            self._oldest_at = self._clock()
        self._items.append(item)
        if len(self._items) >= self.max_size:
            return self._take(CloseCause.SIZE)
        return None

    def seconds_until_due(self) -> float | None:
        """Seconds until the open batch times out; ``None`` when empty, 0 when already due."""
        if not self._items:
            return None
        return max(0.0, self._oldest_at + self.max_wait_s - self._clock())

    def take_if_due(self) -> Batch[T] | None:
        """The open batch if its oldest item has waited ``max_wait_s``."""
        remaining = self.seconds_until_due()
        if remaining is None or remaining > 0:
            return None
        return self._take(CloseCause.TIMEOUT)

    def drain(self) -> Batch[T] | None:
        """The open batch whatever its age (shutdown, rebalance)."""
        if not self._items:
            return None
        return self._take(CloseCause.DRAIN)

    def _take(self, cause: CloseCause) -> Batch[T]:
        items, self._items = self._items, []
        return Batch(items, cause)
