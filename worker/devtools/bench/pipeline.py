"""Kafka in to Kafka out: the worker, the bare work it cannot avoid, and the NeMo Curator-style baseline.

All three embed the same corpus with the same model on the same cores in the same run, so their ratio is
what the pipeline costs (or gains) and not the machine's mood.
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from worker.config import Settings, load_settings
from worker.devtools.bench.gpu_busy import mean_busy
from worker.devtools.bench.preprocess import reference_pixels, reference_processor
from worker.devtools.bench.report import Report
from worker.devtools.bench.worker_run import ABANDON_S, RowFailed, WorkerRun
from worker.imaging.device_decode import DeviceJpegDecoder, decoded_only
from worker.imaging.host import ImageLimits, prepare
from worker.inference.embedder import Embedder
from worker.kafka_io import (
    IgnoreRebalances,
    TopicPartition,
    ensure_topics,
    open_consumer,
    open_producer,
    open_reader,
)
from worker.messages import Source, decode_request, encode_embedding, encode_request
from worker.ops.metrics import WorkerMetrics

_CLOSE_S = 10.0
_POLL_RECORDS = 500


def resident_mb() -> float:
    """Resident set size of this process in MiB (Linux)."""
    with open(f"/proc/{os.getpid()}/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass(frozen=True)
class Workload:
    """The corpus and the knobs shared by the pipeline runs."""

    corpus: list[bytes]
    batch_size: int
    decode_workers: int
    resize: str
    decode: str = "pil"
    partitions: int = 4
    timeout_s: float = 600.0  # a worker row that takes longer (start-up and compile included) fails
    gpu_samples: Path | None = (
        None  # the GPU busy sampler's file (worker.devtools.bench.gpu_busy), if one runs
    )
    kafka_client: str = "kafka-python"  # --kafka-client of every row that goes through a broker


def bench_bare(report: Report, embedder: Embedder, work: Workload) -> float:
    """Decode + preprocess (same thread count as the worker) + forward, batch after batch, no Kafka."""
    limits = ImageLimits()
    params = replace(embedder.preprocessing, resize=work.resize, decode=work.decode)
    device_decoder = DeviceJpegDecoder(embedder.device, limits) if work.decode == "device" else None
    with ThreadPoolExecutor(max_workers=work.decode_workers) as pool:
        started = time.perf_counter()
        for start in range(0, len(work.corpus), work.batch_size):
            chunk = work.corpus[start : start + work.batch_size]
            prepared = list(pool.map(lambda d: prepare(d, limits, params), chunk))
            if device_decoder is not None:
                with embedder.on_own_stream():
                    decoded = device_decoder.materialise(prepared)
                embedder.embed_decoded(decoded_only(decoded))
            elif work.resize == "device":
                embedder.embed_decoded([p for p in prepared if isinstance(p, np.ndarray)])
            else:
                embedder.embed(np.stack([p for p in prepared if isinstance(p, np.ndarray)]))
        elapsed = time.perf_counter() - started
    row = report.add(
        "bare",
        f"decode+preprocess+forward, batch {work.batch_size}",
        len(work.corpus) / elapsed,
        threads=work.decode_workers,
        resize=work.resize,
        decode=work.decode,
    )
    return row.images_per_s


def fresh_settings(bootstrap: str, work: Workload, **extra: Any) -> Settings:
    tag = f"bench-{uuid.uuid4().hex[:8]}"
    values: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "input_topic": f"{tag}.images",
        "output_topic": f"{tag}.embeddings",
        "dlq_topic": f"{tag}.dlq",
        "group_id": f"{tag}.group",
        "batch_size": work.batch_size,
        "decode_workers": work.decode_workers,
        "resize": work.resize,
        "decode": work.decode,
        "metrics_port": 0,
        "session_timeout_ms": 6000,
        "log_level": "warning",
        "kafka_client": work.kafka_client,
        **extra,
    }
    settings = load_settings(values, environ={})
    ensure_topics(
        settings,
        {
            settings.input_topic: work.partitions,
            settings.output_topic: work.partitions,
            settings.dlq_topic: 1,
        },
    )
    return settings


def fill_backlog(settings: Settings, corpus: list[bytes], values: list[bytes] | None = None) -> None:
    """One request per image of ``corpus`` (or the record ``values`` given instead)."""
    producer = open_producer(settings)
    if values is None:
        values = [encode_request(f"img-{index}", data) for index, data in enumerate(corpus)]
    for index, value in enumerate(values):
        producer.send(settings.input_topic, str(index).encode(), value, [])
    producer.flush()
    producer.close(timeout=_CLOSE_S)


def bench_worker(
    report: Report,
    embedder: Embedder,
    work: Workload,
    bootstrap: str,
    exactly_once: bool = False,
    compile_mode: str = "off",
    label: str = "",
    settings_extra: dict[str, Any] | None = None,
    backlog: list[bytes] | None = None,
) -> float | None:
    """The real worker on a backlog: first record consumed to last result acknowledged.

    In exactly-once mode results become visible when their transaction commits, so the clock stops when
    the group's committed offsets cover the backlog. Only embedded records count as done: dead letters and
    device-decode fallbacks are columns, and a dead letter fails the row (the corpus has no bad input).
    Returns the images/s, or None when the row failed (a dead or hung worker, a dead letter); the row then
    says why. ``backlog``: the request record values to use instead of the corpus's inline requests (one
    per corpus image), with ``settings_extra`` for the worker.
    """
    extra: dict[str, Any] = dict(settings_extra or {})
    if exactly_once:
        extra |= {"exactly_once": True, "transactional_id": f"bench-{uuid.uuid4().hex[:8]}"}
    if compile_mode != "off":
        extra["compile"] = compile_mode
    mode = (", --exactly-once" if exactly_once else "") + (
        f", --compile {compile_mode}" * (compile_mode != "off")
    )
    case = f"clip-worker, batch {work.batch_size}{mode}{label}"
    knobs = {
        "threads": work.decode_workers,
        "resize": work.resize,
        "decode": work.decode,
        "kafka_client": work.kafka_client,
    }
    settings = fresh_settings(bootstrap, work, **extra)
    fill_backlog(settings, work.corpus, backlog)
    metrics = WorkerMetrics()
    total = len(work.corpus)
    rss_before = resident_mb()
    run = WorkerRun(settings, embedder, metrics, work.timeout_s).start()
    window = _SteadyWindow(total)
    try:
        run.wait_until(lambda: _count(metrics.consumed) > 0, "the first record to be consumed")
        started = time.perf_counter()

        def all_accounted() -> bool:
            done = _count(metrics.published) + dlq_total(metrics)
            window.see(done)
            return done >= total

        run.wait_until(all_accounted, "every record to be embedded or dead-lettered")
        if exactly_once:
            _wait_until_committed(run, total)
        elapsed = time.perf_counter() - started
    except RowFailed as failure:
        report.add("end-to-end", case, 0.0, failed=str(failure), **knobs, **_outcome(metrics))
        run.stop(ABANDON_S)
        return None
    except BaseException:
        run.stop(ABANDON_S)
        raise
    run.stop()
    outcome = _outcome(metrics)
    failed = None
    if outcome["dead_letters"]:
        failed = f"{outcome['dead_letters']} dead letter(s) {_dlq_reasons(metrics)}; the corpus has none"
    busy = _histogram_sum(metrics, "inference") / elapsed
    gpu = mean_busy(work.gpu_samples, *window.bounds()) if work.gpu_samples else {}
    row = report.add(
        "end-to-end",
        case,
        outcome["embedded"] / elapsed,
        failed=failed,
        **knobs,
        steady_img_s=window.rate(),
        model_busy=f"{busy:.0%}",
        **gpu,
        **outcome,
        rss_mb=f"{rss_before:.0f}->{resident_mb():.0f}",
    )
    return None if failed else row.images_per_s  # a failed row feeds no ratio


class _SteadyWindow:
    """Wall-clock times at which 10% and 90% of the backlog were done: the row's steady state, without the
    start-up and the tail (the window the GPU busy figure is averaged over)."""

    def __init__(self, total: int) -> None:
        self._marks = (0.1 * total, 0.9 * total)
        self.start: float | None = None
        self.end: float | None = None

    def see(self, done: float) -> None:
        now = time.time()
        if self.start is None and done >= self._marks[0]:
            self.start = now
        if self.end is None and done >= self._marks[1]:
            self.end = now

    def bounds(self) -> tuple[float, float]:
        now = time.time()
        return (self.start or now, self.end or now)

    def rate(self) -> float | None:
        """Images/s between the two marks: the rate without the pipeline's fill and drain (a fetch's round
        trip before the first image of a by-reference row, say); None if the window is too short to tell."""
        if self.start is None or self.end is None or self.end - self.start < 0.5:
            return None
        return round((self._marks[1] - self._marks[0]) / (self.end - self.start), 1)


def _count(counter: Any) -> float:
    return float(counter._value.get())


def _outcome(metrics: WorkerMetrics) -> dict[str, int]:
    """What happened to the records: embedded and acknowledged, dead-lettered, decoded on the host after
    the device refused them."""
    return {
        "embedded": int(_count(metrics.published)),
        "dead_letters": int(dlq_total(metrics)),
        "device_decode_fallbacks": int(_count(metrics.device_decode_fallbacks)),
    }


def _dlq_reasons(metrics: WorkerMetrics) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for family in metrics.dlq.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.value:
                reasons[sample.labels["reason"]] = int(sample.value)
    return reasons


def _wait_until_committed(run: WorkerRun, total: int) -> None:
    """Read the output topic read_committed until ``total`` results are visible: the transactions that
    carry them carry the group's offsets too, so the commits then cover the backlog."""
    reader = open_reader(run.settings, read_committed=True)
    reader.subscribe([run.settings.output_topic], IgnoreRebalances())
    seen = 0

    def committed() -> bool:
        nonlocal seen
        seen += sum(len(records) for records in reader.poll(50, _POLL_RECORDS).values())
        return seen >= total

    try:
        run.wait_until(committed, "the committed results to cover the backlog")
    finally:
        reader.close(int(_CLOSE_S * 1000))


def bench_baseline(
    report: Report, embedder: Embedder, work: Workload, bootstrap: str, images: int = 0
) -> float | None:
    """NeMo Curator-style: poll 32, reference preprocessing per image, fp32 forward, send, flush, commit.

    Over the first ``images`` records of the corpus (0: all of it); None if it ran out of time.
    """
    batch = 32
    corpus = work.corpus[:images] if images else work.corpus
    settings = fresh_settings(bootstrap, work)
    fill_backlog(settings, corpus)
    processor = reference_processor(embedder)
    consumer = open_consumer(settings)
    producer = open_producer(settings)
    consumer.subscribe([settings.input_topic], IgnoreRebalances())
    done = 0
    started: float | None = None
    deadline = time.monotonic() + work.timeout_s
    case = f"NeMo Curator-style baseline, batch {batch}"
    try:
        while done < len(corpus):
            if time.monotonic() > deadline:
                report.add(
                    "end-to-end",
                    case,
                    0.0,
                    failed=f"timed out after {work.timeout_s:.0f}s with {done} of {len(corpus)} records",
                )
                return None
            records = [r for rs in consumer.poll(100, batch).values() for r in rs]
            if not records:
                continue
            started = started or time.perf_counter()
            requests = [decode_request(r.value) for r in records]
            pixels = np.stack([reference_pixels(processor, q.image or b"") for q in requests])
            vectors = embedder.embed(pixels)
            for record, request, vector in zip(records, requests, vectors, strict=True):
                source = Source(record.topic, record.partition, record.offset)
                value = encode_embedding(request, vector, embedder.label, source, False)
                producer.send(settings.output_topic, None, value, [])
            producer.flush()
            consumer.commit({_partition(r): r.offset + 1 for r in records}, int(_CLOSE_S * 1000))
            done += len(records)
        elapsed = time.perf_counter() - (started or time.perf_counter())
    finally:
        consumer.close(int(_CLOSE_S * 1000))
        producer.close(_CLOSE_S)
    row = report.add(
        "end-to-end", case, done / elapsed, threads=1, images=done, kafka_client=work.kafka_client
    )
    return row.images_per_s


def _partition(record: Any) -> TopicPartition:
    return TopicPartition(record.topic, record.partition)


def dlq_total(metrics: WorkerMetrics) -> float:
    return sum(s.value for m in metrics.dlq.collect() for s in m.samples if s.name.endswith("_total"))


def _histogram_sum(metrics: WorkerMetrics, stage: str) -> float:
    for family in metrics.stage_seconds.collect():
        for sample in family.samples:
            if sample.name.endswith("_sum") and sample.labels.get("stage") == stage:
                return float(sample.value)
    return 0.0
