"""The worker under benchmark, on a thread the bench watches: every wait has a deadline and checks that the
worker is still alive, so a worker that dies or hangs ends its row with the reason instead of the run."""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable

from worker.config import Settings
from worker.inference.embedder import Embedder
from worker.loop.service import run_worker
from worker.ops.metrics import WorkerMetrics

POLL_S = 0.005
DRAIN_S = 30.0  # a healthy worker drains and stops within this
ABANDON_S = 3.0  # a worker that failed its row gets this long before it is left behind


class RowFailed(Exception):
    """A benchmark row that could not be measured; the message says why."""


class WorkerRun:
    """``run_worker`` on a daemon thread, with its outcome (exit code or exception) kept for the report."""

    def __init__(
        self, settings: Settings, embedder: Embedder, metrics: WorkerMetrics, timeout_s: float
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._error: str | None = None
        self._exit_code: int | None = None
        self._thread = threading.Thread(target=self._run, args=(embedder,), name="bench-worker", daemon=True)

    def start(self) -> WorkerRun:
        """Start the worker thread."""
        self._thread.start()
        return self

    def _run(self, embedder: Embedder) -> None:
        try:
            self._exit_code = run_worker(self.settings, self._stop, embedder, self.metrics)
        except BaseException as exc:  # the bench reports whatever ended the worker
            last = traceback.extract_tb(exc.__traceback__)[-1:]
            where = f" at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno}" if last else ""
            self._error = f"{type(exc).__name__}: {exc}{where}"

    @property
    def is_alive(self) -> bool:
        """True while the worker thread runs."""
        return self._thread.is_alive()

    def why_stopped(self) -> str:
        """The worker's exception, or its exit code if it returned."""
        if self._error is not None:
            return f"the worker died: {self._error}"
        return f"the worker exited with code {self._exit_code} before the backlog was done"

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Poll ``condition`` until it holds; raises :class:`RowFailed` when the worker stops or the row's
        deadline passes first."""
        while not condition():
            if not self.is_alive:
                if condition():  # it finished just before exiting
                    return
                raise RowFailed(f"{self.why_stopped()} (waiting for {what})")
            if time.monotonic() > self.deadline:
                raise RowFailed(f"timed out after {self.timeout_s:.0f}s waiting for {what}")
            time.sleep(POLL_S)

    def stop(self, wait_s: float = DRAIN_S) -> None:
        """Ask the worker to drain and stop; one that has not stopped within ``wait_s`` is left behind (a
        daemon thread; a hung one may still hold the model, so later rows on it fail at their deadline)."""
        self._stop.set()
        self._thread.join(timeout=wait_s)
