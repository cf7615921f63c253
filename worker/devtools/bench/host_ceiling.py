"""``--sections host-ceiling``: the most records/s the host lets the worker do, per Kafka client.

The worker runs with a model and images that cost nothing (the host-cost section's stand-ins: fixed unit
vectors, and photo-sized records that decode as an 8x8 JPEG) against the bare pass-through loop of the
same client: poll, unpack the msgpack envelope, pack and send a 768-d float32 result, commit; no decoding,
no batching, no bookkeeping, no at-least-once ordering. The bare loop is what no worker on that client can
beat on this host; the worker over it is what the worker's own machinery keeps of it.

Both clients run in one sitting over one backlog, each run in a consumer group of its own, the rows
interleaved round by round so the machine's drift falls on every row alike; each row is the median of its
runs.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.config import Settings
from worker.devtools.bench.host_cost import (
    HostCostWork,
    new_group,
    padded_tiny_jpeg,
    run_null_worker,
    worker_warnings_quiet,
)
from worker.devtools.bench.null_model import NULL_LABEL, VIT_L14_DIM
from worker.devtools.bench.pipeline import Workload, fill_backlog, fresh_settings
from worker.devtools.bench.report import Report
from worker.devtools.bench.worker_run import RowFailed
from worker.kafka_io import MAX_POLL_RECORDS, IgnoreRebalances, TopicPartition, open_consumer, open_producer
from worker.messages import Source, decode_request, encode_embedding

SECTION = "host-ceiling"
CLIENTS = ("kafka-python", "librdkafka")
_POLL_MS = 100
_CLOSE_S = 10.0


@dataclass(frozen=True)
class CeilingWork:
    """The section's workload: ``records`` of ``payload_bytes`` each, ``runs`` rounds over ``clients``."""

    records: int = 4000
    payload_bytes: int = 50_000
    batch_size: int = 32
    decode_workers: int = 2
    partitions: int = 2
    runs: int = 3
    clients: tuple[str, ...] = CLIENTS
    timeout_s: float = 600.0


def bench_host_ceiling(report: Report, bootstrap: str, work: CeilingWork) -> dict[str, float]:
    """Run the section; adds one row per client and loop (the median records/s, the runs in its detail)
    and the ratios; returns the medians by row name."""
    payload = padded_tiny_jpeg(work.payload_bytes)
    workload = Workload(
        [payload] * work.records,
        work.batch_size,
        work.decode_workers,
        resize="device",
        partitions=work.partitions,
        timeout_s=work.timeout_s,
    )
    settings = fresh_settings(bootstrap, workload, log_level="error")
    fill_backlog(settings, workload.corpus)
    knobs: dict[str, Any] = {
        "records": work.records,
        "payload_bytes": len(payload),
        "partitions": work.partitions,
        "batch": work.batch_size,
        "threads": work.decode_workers,
    }
    null_work = HostCostWork(
        images=work.records,
        payload_bytes=work.payload_bytes,
        batch_size=work.batch_size,
        decode_workers=work.decode_workers,
        partitions=work.partitions,
        timeout_s=work.timeout_s,
    )
    runs: dict[tuple[str, str], list[float]] = defaultdict(list)
    failed: dict[tuple[str, str], str] = {}
    with worker_warnings_quiet():
        for round_ in range(work.runs):
            for client in work.clients:
                on_client = settings.model_copy(update={"kafka_client": client})
                for loop in ("worker", "bare"):
                    if (client, loop) in failed:
                        continue
                    try:
                        if loop == "worker":
                            rate = run_null_worker(new_group(on_client), null_work, None).images_per_s
                        else:
                            rate = bare_loop(new_group(on_client), work.records, work.timeout_s)
                    except (RowFailed, TimeoutError) as failure:
                        failed[client, loop] = str(failure)
                        continue
                    runs[client, loop].append(rate)
                    print(
                        f"  host ceiling, run {round_ + 1}/{work.runs}: {client} {loop} {rate:,.0f} records/s"
                    )
    medians: dict[str, float] = {}
    for client in work.clients:
        for loop, what in (("worker", "worker, null model"), ("bare", "bare pass-through loop")):
            case = f"{client}: {what}"
            if (client, loop) in failed:
                report.add(SECTION, case, 0.0, failed=failed[client, loop], **knobs)
                continue
            rates = runs[client, loop]
            medians[f"{client} {loop}"] = statistics.median(rates)
            report.add(SECTION, case, medians[f"{client} {loop}"], **knobs, runs=[round(r) for r in rates])
    _ratios(report, medians, work.clients)
    report.checkpoint()
    return medians


def _ratios(report: Report, medians: dict[str, float], clients: tuple[str, ...]) -> None:
    for client in clients:
        worker, bare = medians.get(f"{client} worker"), medians.get(f"{client} bare")
        if worker and bare:
            report.ratios[f"host ceiling: worker / bare loop, {client}"] = round(worker / bare, 3)
    worker_rdk, worker_py = medians.get("librdkafka worker"), medians.get("kafka-python worker")
    if worker_rdk and worker_py:
        report.ratios["host ceiling: librdkafka worker / kafka-python worker"] = round(
            worker_rdk / worker_py, 3
        )


def bare_loop(settings: Settings, records: int, timeout_s: float) -> float:
    """The pass-through loop over the backlog on the client ``settings`` name: records/s from the first
    record polled to the last result acknowledged. Offsets are committed every commit interval, for
    what was polled (not what was acknowledged: the loop keeps no order)."""
    consumer = open_consumer(settings)
    producer = open_producer(settings)
    consumer.subscribe([settings.input_topic], IgnoreRebalances())
    vector = np.zeros(VIT_L14_DIM, dtype=np.float32)
    vector[0] = 1.0
    commit_s = settings.commit_interval_ms / 1000
    deadline = time.monotonic() + timeout_s
    offsets: dict[TopicPartition, int] = {}
    done = 0
    started: float | None = None
    next_commit = 0.0
    try:
        while done < records:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the bare loop timed out after {timeout_s:.0f}s with {done} of {records}")
            for tp, polled in consumer.poll(_POLL_MS, MAX_POLL_RECORDS).items():
                started = started or time.perf_counter()
                for record in polled:
                    request = decode_request(record.value)
                    source = Source(record.topic, record.partition, record.offset)
                    value = encode_embedding(request, vector, NULL_LABEL, source, False)
                    producer.send(settings.output_topic, record.key, value, [])
                offsets[tp] = polled[-1].offset + 1
                done += len(polled)
            if offsets and time.monotonic() >= next_commit:
                consumer.commit(offsets, int(_CLOSE_S * 1000))
                offsets = {}
                next_commit = time.monotonic() + commit_s
        producer.flush(_CLOSE_S * 6)
        elapsed = time.perf_counter() - (started or time.perf_counter())
        if offsets:
            consumer.commit(offsets, int(_CLOSE_S * 1000))
    finally:
        consumer.close(int(_CLOSE_S * 1000))
        producer.close(_CLOSE_S)
    return records / elapsed
