"""Kafka in to Kafka out: the worker, the bare work it cannot avoid, and the NeMo Curator-style baseline.

All three embed the same corpus with the same model on the same cores in the same run, so their ratio is
what the pipeline costs (or gains) and not the machine's mood.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.bench.preprocess import reference_pixels, reference_processor
from worker.bench.report import Report
from worker.config import Settings, load_settings
from worker.device_decode import DeviceJpegDecoder, decoded_only
from worker.embedder import Embedder
from worker.images import ImageLimits, prepare
from worker.kafka_io import ensure_topics, make_consumer, make_producer
from worker.messages import Source, decode_request, encode_embedding, encode_request
from worker.metrics import WorkerMetrics
from worker.service import run_worker

_POLL_S = 0.005


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


def fill_backlog(settings: Settings, corpus: list[bytes]) -> None:
    producer = make_producer(settings)
    for index, data in enumerate(corpus):
        producer.send(
            settings.input_topic, key=str(index).encode(), value=encode_request(f"img-{index}", data)
        )
    producer.flush()
    producer.close()


def bench_worker(
    report: Report,
    embedder: Embedder,
    work: Workload,
    bootstrap: str,
    exactly_once: bool = False,
    compile_mode: str = "off",
) -> float:
    """The real worker on a backlog: first record consumed to last result acknowledged.

    In exactly-once mode results become visible when their transaction commits, so the clock stops when
    the group's committed offsets cover the backlog.
    """
    extra: dict[str, Any] = {}
    if exactly_once:
        extra = {"exactly_once": True, "transactional_id": f"bench-{uuid.uuid4().hex[:8]}"}
    if compile_mode != "off":
        extra["compile"] = compile_mode
    settings = fresh_settings(bootstrap, work, **extra)
    fill_backlog(settings, work.corpus)
    metrics = WorkerMetrics()
    stop = threading.Event()
    rss_before = resident_mb()
    thread = threading.Thread(target=run_worker, args=(settings, stop, embedder, metrics), daemon=True)
    thread.start()
    while metrics.consumed._value.get() == 0:
        time.sleep(_POLL_S)
    started = time.perf_counter()
    total = len(work.corpus)
    while metrics.published._value.get() + dlq_total(metrics) < total:
        time.sleep(_POLL_S)
        if not thread.is_alive():
            raise RuntimeError("the worker stopped during the benchmark")
    if exactly_once:
        _wait_until_committed(settings, work.partitions, total)
    elapsed = time.perf_counter() - started
    stop.set()
    thread.join(timeout=60)
    busy = _histogram_sum(metrics, "inference") / elapsed
    mode = (", --exactly-once" if exactly_once else "") + (
        f", --compile {compile_mode}" * (compile_mode != "off")
    )
    row = report.add(
        "end-to-end",
        f"clip-worker, batch {work.batch_size}{mode}",
        total / elapsed,
        threads=work.decode_workers,
        resize=work.resize,
        decode=work.decode,
        model_busy=f"{busy:.0%}",
        rss_mb=f"{rss_before:.0f}->{resident_mb():.0f}",
    )
    return row.images_per_s


def _wait_until_committed(settings: Settings, partitions: int, total: int) -> None:
    """Poll the group's committed offsets until they cover ``total`` records (offsets start at 0)."""
    consumer = make_consumer(settings)
    try:
        tps = [TopicPartition(settings.input_topic, p) for p in range(partitions)]
        while sum(consumer.committed(tp) or 0 for tp in tps) < total:
            time.sleep(_POLL_S)
    finally:
        consumer.close(autocommit=False)


def bench_baseline(report: Report, embedder: Embedder, work: Workload, bootstrap: str) -> float:
    """NeMo Curator-style: poll 32, reference preprocessing per image, fp32 forward, send, flush, commit."""
    batch = 32
    settings = fresh_settings(bootstrap, work)
    fill_backlog(settings, work.corpus)
    processor = reference_processor(embedder.preprocessing)
    consumer = make_consumer(settings, max_poll_records=batch)
    producer = make_producer(settings)
    consumer.subscribe([settings.input_topic])
    done = 0
    started: float | None = None
    while done < len(work.corpus):
        records = [r for rs in consumer.poll(timeout_ms=100, max_records=batch).values() for r in rs]
        if not records:
            continue
        started = started or time.perf_counter()
        requests = [decode_request(r.value) for r in records]
        pixels = np.stack([reference_pixels(processor, q.image) for q in requests])
        vectors = embedder.embed(pixels)
        for record, request, vector in zip(records, requests, vectors, strict=True):
            source = Source(record.topic, record.partition, record.offset)
            producer.send(
                settings.output_topic, value=encode_embedding(request, vector, embedder.label, source, False)
            )
        producer.flush()
        consumer.commit(
            {TopicPartition(r.topic, r.partition): OffsetAndMetadata(r.offset + 1, "", -1) for r in records}
        )
        done += len(records)
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close(autocommit=False)
    producer.close()
    row = report.add("end-to-end", f"NeMo Curator-style baseline, batch {batch}", done / elapsed, threads=1)
    return row.images_per_s


def dlq_total(metrics: WorkerMetrics) -> float:
    return sum(s.value for m in metrics.dlq.collect() for s in m.samples if s.name.endswith("_total"))


def _histogram_sum(metrics: WorkerMetrics, stage: str) -> float:
    for family in metrics.stage_seconds.collect():
        for sample in family.samples:
            if sample.name.endswith("_sum") and sample.labels.get("stage") == stage:
                return float(sample.value)
    return 0.0
