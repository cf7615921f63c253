"""What the health endpoints report: liveness (the loop makes progress, its checks pass) and readiness
(the model is loaded, partitions are assigned, its checks pass)."""

from __future__ import annotations

import time
from collections.abc import Callable

HealthCheck = Callable[[], str | None]


class HealthState:
    """What the health endpoints report.

    Liveness: the main loop made progress recently and every registered liveness check passes (the
    pipeline moves, its threads are alive). Readiness: the model is loaded, the consumer holds a group
    assignment and every registered readiness check passes (the topics exist, deliveries succeed). A check
    returns None when all is well, else a one-line reason that the endpoint answers with.
    """

    def __init__(self, stall_after_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._stall_after_s = stall_after_s
        self._last_beat = clock()
        self.model_loaded = False
        self.in_group = False
        self._liveness: list[HealthCheck] = []
        self._readiness: list[HealthCheck] = []

    def beat(self) -> None:
        """The main loop completed an iteration."""
        self._last_beat = self._clock()

    def add_liveness_check(self, check: HealthCheck) -> None:
        """A check whose failure means the worker cannot recover by itself (restart it)."""
        self._liveness.append(check)

    def add_readiness_check(self, check: HealthCheck) -> None:
        """A check whose failure means the worker cannot do its job right now."""
        self._readiness.append(check)

    def liveness_problem(self) -> str | None:
        """Why the worker is not alive, or None."""
        stalled = self._clock() - self._last_beat
        if stalled >= self._stall_after_s:
            return f"the main loop has not run for {stalled:.0f}s"
        return _first_problem(self._liveness)

    def readiness_problem(self) -> str | None:
        """Why the worker is not ready, or None."""
        if not self.model_loaded:
            return "the model is not loaded yet"
        problem = _first_problem(self._readiness)
        if problem is None and not self.in_group:
            return "no partition assignment from the consumer group yet"
        return problem


def _first_problem(checks: list[HealthCheck]) -> str | None:
    for check in checks:
        problem = check()
        if problem is not None:
            return problem
    return None
