"""The worker fetching its images by reference: the same corpus served by a local HTTP server that adds a
latency to every image, so the row shows whether concurrent fetching hides it."""

from __future__ import annotations

from worker.devtools.bench.pipeline import Workload, bench_worker
from worker.devtools.bench.report import Report
from worker.devtools.origin import ImageOrigin
from worker.embedder import Embedder
from worker.messages import encode_reference


def bench_by_reference(
    report: Report, embedder: Embedder, work: Workload, bootstrap: str, latency_s: float, concurrency: int = 0
) -> float | None:
    """The end-to-end row with ``uri`` requests to a loopback server (``latency_s`` before each image's
    headers, one object per record so nothing is shared); images/s, or None when the row failed."""
    with ImageOrigin(latency_s=latency_s) as origin:
        backlog = [
            encode_reference(f"img-{index}", origin.put(f"{index}.jpg", data))
            for index, data in enumerate(work.corpus)
        ]
        extra: dict[str, object] = {"fetch_allow_hosts": origin.host}
        if concurrency:
            extra["fetch_concurrency"] = concurrency
        label = f", by reference (+{latency_s * 1000:.0f} ms per image"
        label += f", --fetch-concurrency {concurrency})" if concurrency else ")"
        return bench_worker(
            report, embedder, work, bootstrap, label=label, settings_extra=extra, backlog=backlog
        )
