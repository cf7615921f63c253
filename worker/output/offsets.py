"""Per-partition acknowledgement tracking: which offsets are safe to commit.

An offset is committable only when every record before it in that partition was acknowledged by the
broker (in the output topic or the DLQ). Acknowledgements arrive on the producer's I/O thread, so every
method takes a lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from worker.kafka_io import TopicPartition


@dataclass
class _PartitionState:
    pending: deque[int] = field(default_factory=deque)
    sizes: dict[int, int] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)
    position: int | None = None  # offset after the last polled record
    next_commit: int | None = None  # offset after the highest contiguous acknowledged record
    committed: int | None = None
    first: int | None = None  # first offset polled since the partition was assigned


class OffsetTracker:
    """Tracks polled offsets of owned partitions and computes safe commit positions."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._partitions: dict[TopicPartition, _PartitionState] = {}
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._progress_at = clock()  # last acknowledgement, or when work arrived after none was pending

    def assign(self, partitions: set[TopicPartition]) -> None:
        """Start tracking newly owned partitions with a clean state."""
        with self._lock:
            for tp in partitions:
                self._drop(tp)
                self._partitions[tp] = _PartitionState()

    def revoke(self, partitions: set[TopicPartition]) -> None:
        """Stop tracking partitions we no longer own: their pending work will never be committed by us."""
        with self._lock:
            for tp in partitions:
                self._drop(tp)

    def _drop(self, tp: TopicPartition) -> None:
        old = self._partitions.pop(tp, None)
        if old is not None:
            self._in_flight -= len(old.pending)
            self._in_flight_bytes -= sum(old.sizes.values())

    def owned(self) -> set[TopicPartition]:
        """Partitions currently tracked."""
        with self._lock:
            return set(self._partitions)

    def track(self, tp: TopicPartition, offset: int, size: int = 0) -> bool:
        """Register a polled record of ``size`` bytes; False if the partition is not owned (revoked)."""
        with self._lock:
            state = self._partitions.get(tp)
            if state is None:
                return False
            state.position = offset + 1
            if state.first is None:
                state.first = offset
            if state.pending and offset <= state.pending[-1]:
                return True  # re-delivered after a seek: already pending
            state.pending.append(offset)
            state.sizes[offset] = size
            if self._in_flight == 0:
                self._progress_at = self._clock()
            self._in_flight += 1
            self._in_flight_bytes += size
            return True

    def ack(self, tp: TopicPartition, offset: int) -> None:
        """The broker acknowledged the record's result (output or DLQ)."""
        with self._lock:
            state = self._partitions.get(tp)
            if state is None or not state.pending or offset < state.pending[0]:
                return  # revoked, or a duplicate acknowledgement of a record already counted
            state.acked.add(offset)
            self._progress_at = self._clock()
            while state.pending and state.pending[0] in state.acked:
                done = state.pending.popleft()
                state.acked.discard(done)
                state.next_commit = done + 1
                self._in_flight -= 1
                self._in_flight_bytes -= state.sizes.pop(done, 0)

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets to commit now: positions that advanced since the last commit."""
        with self._lock:
            return {
                tp: state.next_commit
                for tp, state in self._partitions.items()
                if state.next_commit is not None and state.next_commit != state.committed
            }

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Record a successful commit."""
        with self._lock:
            for tp, offset in offsets.items():
                state = self._partitions.get(tp)
                if state is not None:
                    state.committed = offset

    def rewind(self) -> dict[TopicPartition, int]:
        """Forget all progress since the last commit; returns where each partition must be read again.

        That is the last committed offset, or the first offset polled when nothing was committed yet;
        partitions that have polled nothing are left where they are.
        """
        with self._lock:
            targets: dict[TopicPartition, int] = {}
            for tp, state in list(self._partitions.items()):
                target = state.committed if state.committed is not None else state.first
                if target is not None:
                    targets[tp] = target
                self._drop(tp)
                self._partitions[tp] = _PartitionState(
                    next_commit=state.committed, committed=state.committed, first=state.first
                )
            return targets

    @property
    def in_flight(self) -> int:
        """Records polled but not yet acknowledged, over all owned partitions."""
        with self._lock:
            return self._in_flight

    def unacknowledged(self, given_back: Mapping[TopicPartition, int]) -> int:
        """Records polled and not yet acknowledged, but for those at or after the offset ``given_back``
        names for their partition: records this worker gave up on, left for the next owner to read."""
        with self._lock:
            count = 0
            for tp, state in self._partitions.items():
                bound = given_back.get(tp)
                count += sum(
                    1
                    for offset in state.pending
                    if offset not in state.acked and (bound is None or offset < bound)
                )
            return count

    def stalled_for(self) -> float:
        """Seconds without any acknowledgement while records are in flight; 0 when nothing is pending."""
        with self._lock:
            return self._clock() - self._progress_at if self._in_flight else 0.0

    @property
    def in_flight_bytes(self) -> int:
        """Bytes of the record values counted by :attr:`in_flight`."""
        with self._lock:
            return self._in_flight_bytes

    def positions(self) -> dict[TopicPartition, int]:
        """Offset after the last polled record, per owned partition that has polled anything."""
        with self._lock:
            return {tp: s.position for tp, s in self._partitions.items() if s.position is not None}
