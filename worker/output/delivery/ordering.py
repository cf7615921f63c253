"""Release results in the order their records were polled, one partition at a time.

Exactly-once mode commits a transaction with the consumed offset of each partition. That offset is only
right if the transaction holds the results of exactly the records before it: a result that overtook an
earlier record (a dead letter decided at poll time, say) would be published by a transaction whose
offset does not cover it, and published again after a crash. So results wait here until every earlier
record of their partition has one.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from worker.kafka_io import TopicPartition

T = TypeVar("T")


class OutOfOrderError(Exception):
    """A result arrived for an offset that was never expected (a bug, never a user error)."""


class InOrderRelease(Generic[T]):
    """Holds each partition's results until all earlier offsets of that partition have theirs.

    Not thread-safe: the caller serialises access (the transaction lock).
    """

    def __init__(self) -> None:
        self._expected: dict[TopicPartition, deque[int]] = {}
        self._waiting: dict[TopicPartition, dict[int, T]] = {}
        self._last_released: dict[TopicPartition, int] = {}
        self._released_since_mark: dict[TopicPartition, int] = {}

    def expect(self, tp: TopicPartition, offset: int) -> bool:
        """Register a polled offset. False if it is not past the last one expected (a re-delivery)."""
        expected = self._expected.setdefault(tp, deque())
        last = expected[-1] if expected else self._last_released.get(tp, -1)
        if offset <= last:
            return False
        expected.append(offset)
        return True

    def ready(self, tp: TopicPartition, offset: int, item: T) -> list[T]:
        """The result for ``offset`` is ready: returns the results that may now be sent, in order."""
        expected = self._expected.get(tp)
        if not expected or offset < expected[0] or offset > expected[-1]:
            raise OutOfOrderError(f"a result for {tp.topic}[{tp.partition}] offset {offset} was not expected")
        waiting = self._waiting.setdefault(tp, {})
        waiting[offset] = item
        out: list[T] = []
        while expected and expected[0] in waiting:
            head = expected.popleft()
            out.append(waiting.pop(head))
            self._last_released[tp] = head
            self._released_since_mark[tp] = head
        return out

    def released_since_mark(self) -> dict[TopicPartition, int]:
        """The last offset released per partition since :meth:`mark` (or :meth:`clear`)."""
        return dict(self._released_since_mark)

    def mark(self) -> None:
        """Start counting releases afresh (a transaction was committed)."""
        self._released_since_mark.clear()

    def clear(self) -> None:
        """Forget everything (after a transaction abort, when all partitions are read again)."""
        self._expected.clear()
        self._waiting.clear()
        self._last_released.clear()
        self._released_since_mark.clear()
