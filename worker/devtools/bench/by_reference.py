"""The worker fetching its images by reference: the same corpus served by a local HTTP server that adds a
latency to every image, so the row shows whether concurrent fetching hides it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from worker.devtools.bench.pipeline import (
    Workload,
    bench_worker,
    dlq_total,
    fill_backlog,
    fresh_settings,
)
from worker.devtools.bench.report import Report
from worker.devtools.bench.soak import drain_sampling_rss
from worker.devtools.origin import OriginProcess
from worker.devtools.samples import jpeg_corpus
from worker.inference.embedder import Embedder
from worker.messages import encode_reference
from worker.ops.metrics import WorkerMetrics


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


def bench_reference_memory(
    report: Report,
    embedder: Embedder,
    work: Workload,
    bootstrap: str,
    images: int,
    image_mb: float,
    max_in_flight: int,
    concurrency: int = 0,
) -> None:
    """Resident memory while the worker drains ``images`` references to ``image_mb`` MB images (a small
    JPEG padded after its end marker, so the bytes are large and decoding cheap), sampled after each tenth
    of the backlog; flat after the first tenth means the fetched bodies are bounded."""
    small = jpeg_corpus(1, 160, 120)[0]
    data = small + bytes(max(0, int(image_mb * 2**20) - len(small)))
    case = f"{images} references to {len(data) / 2**20:.1f} MB images, max in flight {max_in_flight}"
    extra: dict[str, object] = {"max_in_flight": max_in_flight, "fetch_allow_hosts": "127.0.0.1"}
    if concurrency:
        extra["fetch_concurrency"] = concurrency
        case += f", --fetch-concurrency {concurrency}"
    with tempfile.TemporaryDirectory(prefix="clip-bench-origin-") as folder:
        root = Path(folder)
        (root / "image.jpg").write_bytes(data)
        for index in range(images):  # one name per record, one file on disk
            (root / f"{index}.jpg").symlink_to(root / "image.jpg")
        with OriginProcess(root, 0.0) as origin:
            backlog = [encode_reference(f"img-{i}", origin.url(f"/o/{i}.jpg")) for i in range(images)]
            settings = fresh_settings(bootstrap, work, **extra)
            fill_backlog(settings, [], backlog)
            metrics = WorkerMetrics()
            drained = drain_sampling_rss(settings, embedder, metrics, images, work.timeout_s)
    samples = drained.rss_mb
    if drained.elapsed_s is None:
        report.add("ref-memory", case, 0.0, failed=drained.failure, rss_mb=samples)
        return
    elapsed = drained.elapsed_s
    steady = samples[1:]  # the first tenth includes allocator, pools and model warm-up
    report.add(
        "ref-memory",
        case,
        images / elapsed,
        rss_mb=samples,
        max_over_first_tenth=f"{(max(steady) - samples[0]) / samples[0]:+.1%}",
        growth_after_first_tenth=f"{(steady[-1] - steady[0]) / steady[0]:+.1%}",
        dead_letters=int(dlq_total(metrics)),
    )
