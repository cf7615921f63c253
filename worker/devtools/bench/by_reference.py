"""The worker fetching its images by reference: the same corpus served by a local HTTP server that adds a
latency to every image, so the row shows whether concurrent fetching hides it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from worker.devtools.bench.pipeline import Workload, bench_worker
from worker.devtools.bench.report import Report
from worker.devtools.origin import OriginProcess
from worker.embedder import Embedder
from worker.messages import encode_reference


def bench_by_reference(
    report: Report, embedder: Embedder, work: Workload, bootstrap: str, latency_s: float, concurrency: int = 0
) -> float | None:
    """The end-to-end row with ``uri`` requests to a loopback server in its own process (``latency_s``
    before each image's headers, one file per record so nothing is shared); images/s, or None when the
    row failed."""
    with tempfile.TemporaryDirectory(prefix="clip-bench-origin-") as folder:
        root = Path(folder)
        for index, data in enumerate(work.corpus):
            (root / f"{index}.jpg").write_bytes(data)
        with OriginProcess(root, latency_s) as origin:
            return _run(report, embedder, work, bootstrap, origin, concurrency)


def _run(
    report: Report,
    embedder: Embedder,
    work: Workload,
    bootstrap: str,
    origin: OriginProcess,
    concurrency: int,
) -> float | None:
    backlog = [
        encode_reference(f"img-{index}", origin.url(f"/o/{index}.jpg")) for index in range(len(work.corpus))
    ]
    extra: dict[str, object] = {"fetch_allow_hosts": "127.0.0.1"}
    if concurrency:
        extra["fetch_concurrency"] = concurrency
    label = f", by reference (+{origin.latency_s * 1000:.0f} ms per image"
    label += f", --fetch-concurrency {concurrency})" if concurrency else ")"
    return bench_worker(report, embedder, work, bootstrap, label=label, settings_extra=extra, backlog=backlog)
