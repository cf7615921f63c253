"""Memory under a long backlog: resident memory sampled while the worker drains N messages."""

from __future__ import annotations

import time
from dataclasses import dataclass

from worker.config import Settings
from worker.devtools.bench.pipeline import Workload, dlq_total, fill_backlog, fresh_settings, resident_mb
from worker.devtools.bench.report import Report
from worker.devtools.bench.worker_run import ABANDON_S, RowFailed, WorkerRun
from worker.inference.embedder import Embedder
from worker.ops.metrics import WorkerMetrics

_SAMPLES = 10


def bench_soak(
    report: Report, embedder: Embedder, work: Workload, bootstrap: str, max_in_flight: int
) -> None:
    """RSS after each tenth of the backlog; flat means the in-flight cap bounds memory."""
    settings = fresh_settings(bootstrap, work, max_in_flight=max_in_flight)
    fill_backlog(settings, work.corpus)
    total = len(work.corpus)
    case = f"{total} messages, max in flight {max_in_flight}"
    drained = drain_sampling_rss(settings, embedder, WorkerMetrics(), total, work.timeout_s)
    if drained.elapsed_s is None:
        report.add("soak", case, 0.0, failed=drained.failure, rss_mb=drained.rss_mb)
        return
    samples = drained.rss_mb
    steady = samples[1:]  # the first tenth includes allocator and model warm-up
    growth = (steady[-1] - steady[0]) / steady[0]
    report.add(
        "soak",
        case,
        total / drained.elapsed_s,
        rss_mb=samples,
        growth_after_first_tenth=f"{growth:+.1%}",
    )


@dataclass(frozen=True)
class Drained:
    """Resident memory (MB) after each tenth of a backlog, and the seconds the worker took to drain it;
    ``elapsed_s`` is None when the run failed, and ``failure`` says why."""

    rss_mb: list[float]
    elapsed_s: float | None
    failure: str | None = None


def drain_sampling_rss(
    settings: Settings, embedder: Embedder, metrics: WorkerMetrics, total: int, timeout_s: float
) -> Drained:
    """Run the worker until ``total`` records are published or dead-lettered, sampling RSS at each tenth."""
    marks = [total * (i + 1) // _SAMPLES for i in range(_SAMPLES)]
    samples: list[float] = []

    def sampled_all() -> bool:
        done = metrics.published._value.get() + dlq_total(metrics)
        while marks and done >= marks[0]:
            samples.append(round(resident_mb(), 1))
            marks.pop(0)
        return not marks

    run = WorkerRun(settings, embedder, metrics, timeout_s).start()
    started = time.perf_counter()
    try:
        run.wait_until(sampled_all, "the backlog to drain")
    except RowFailed as failure:
        run.stop(ABANDON_S)
        return Drained(samples, None, str(failure))
    elapsed = time.perf_counter() - started
    run.stop()
    return Drained(samples, elapsed)
