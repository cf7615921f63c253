"""Memory under a long backlog: resident memory sampled while the worker drains N messages."""

from __future__ import annotations

import threading
import time

from worker.bench.pipeline import Workload, dlq_total, fill_backlog, fresh_settings, resident_mb
from worker.bench.report import Report
from worker.embedder import Embedder
from worker.metrics import WorkerMetrics
from worker.service import run_worker

_SAMPLES = 10


def bench_soak(
    report: Report, embedder: Embedder, work: Workload, bootstrap: str, max_in_flight: int
) -> None:
    """RSS after each tenth of the backlog; flat means the in-flight cap bounds memory."""
    settings = fresh_settings(bootstrap, work, max_in_flight=max_in_flight)
    fill_backlog(settings, work.corpus)
    metrics = WorkerMetrics()
    stop = threading.Event()
    thread = threading.Thread(target=run_worker, args=(settings, stop, embedder, metrics), daemon=True)
    thread.start()
    total = len(work.corpus)
    marks = [total * (i + 1) // _SAMPLES for i in range(_SAMPLES)]
    samples: list[float] = []
    started = time.perf_counter()
    while marks:
        done = metrics.published._value.get() + dlq_total(metrics)
        if done >= marks[0]:
            samples.append(round(resident_mb(), 1))
            marks.pop(0)
        elif not thread.is_alive():
            raise RuntimeError("the worker stopped during the soak")
        else:
            time.sleep(0.05)
    elapsed = time.perf_counter() - started
    stop.set()
    thread.join(timeout=60)
    steady = samples[1:]  # the first tenth includes allocator and model warm-up
    growth = (steady[-1] - steady[0]) / steady[0]
    report.add(
        "soak",
        f"{total} messages, max in flight {max_in_flight}",
        total / elapsed,
        rss_mb=samples,
        growth_after_first_tenth=f"{growth:+.1%}",
    )
