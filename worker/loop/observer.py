"""Periodic observations from the poll loop: lag per partition, in-flight gauges, the progress log line."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from worker.kafka_io import Consumer, TopicPartition
from worker.ops.gpu import GpuCollector
from worker.ops.metrics import WorkerMetrics
from worker.output.offsets import OffsetTracker

log = logging.getLogger(__name__)
_OBSERVE_EVERY_S = 1.0


class Observer:
    """Updates gauges about once a second and logs a progress line every ``progress_interval_s``."""

    def __init__(
        self,
        consumer: Consumer,
        tracker: OffsetTracker,
        metrics: WorkerMetrics,
        progress_interval_s: float,
        gpu: GpuCollector | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._consumer = consumer
        self._tracker = tracker
        self._metrics = metrics
        self._progress_interval_s = progress_interval_s
        self._gpu = gpu
        self._clock = clock
        self._next_observation = clock()
        self._last_progress_at = clock()
        self._last_embedded = 0.0
        self._lag_labels: set[tuple[str, str]] = set()
        self.total_lag = 0

    def maybe_observe(self) -> None:
        """Cheap unless a second has passed since the last observation."""
        now = self._clock()
        if now < self._next_observation:
            return
        self._next_observation = now + _OBSERVE_EVERY_S
        self._metrics.last_progress.set_to_current_time()
        self._metrics.in_flight_images.set(self._tracker.in_flight)
        self._metrics.in_flight_bytes.set(self._tracker.in_flight_bytes)
        self._metrics.stalled_seconds.set(self._tracker.stalled_for())
        self._update_lag()
        if self._progress_interval_s and now - self._last_progress_at >= self._progress_interval_s:
            self._log_progress(now)

    def _update_lag(self) -> None:
        labels: set[tuple[str, str]] = set()
        total = 0
        for tp, position in self._tracker.positions().items():
            highwater = self._highwater(tp)
            if highwater is None:
                continue
            lag = max(0, highwater - position)
            label = (tp.topic, str(tp.partition))
            self._metrics.lag.labels(*label).set(lag)
            labels.add(label)
            total += lag
        for stale in self._lag_labels - labels:
            self._metrics.lag.remove(*stale)
        self._lag_labels = labels
        self.total_lag = total

    def _highwater(self, tp: TopicPartition) -> int | None:
        try:
            return self._consumer.highwater(tp)
        except Exception:  # revoked between the two calls
            return None

    def _log_progress(self, now: float) -> None:
        embedded = self._metrics.embedded._value.get()
        rate = (embedded - self._last_embedded) / max(1e-9, now - self._last_progress_at)
        self._last_embedded = embedded
        self._last_progress_at = now
        utilisation = self._gpu.utilization() if self._gpu is not None else None
        gpu = f", GPU {utilisation:.0%}" if utilisation is not None else ""
        log.info(
            "progress: %.1f images/s, lag %d, in flight %d%s",
            rate,
            self.total_lag,
            self._tracker.in_flight,
            gpu,
        )
