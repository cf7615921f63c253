"""``--sections host-cost``: what each image costs the host outside decoding and the model.

The worker runs end to end against a real broker with a model that costs nothing
(:class:`~worker.devtools.bench.null_model.NullEmbedder`) and images that cost next to nothing to decode
(an 8x8 JPEG padded with comment segments to the payload size, decoded with ``--resize device`` so the
decode threads only decode it and the stand-in model skips the resize), so what is left is the per-image
host cost: the Kafka clients, envelopes, batching, publishing, bookkeeping and metrics.

Four runs over the same backlog, each in its own consumer group: unprofiled (the wall-clock throughput the
figures are checked against), sampled by py-spy for the threads that run, sampled for the thread that holds
the GIL (:mod:`worker.devtools.bench.sampler`), and unprofiled again. Each thread's CPU time comes from the
kernel (its CPU clock) and is split over the stages in proportion to that thread's samples, waits left
out; GIL time is the GIL sampler's samples over its rate. GIL time is wall time: a holder the OS
preempts still holds it, so on a crowded machine a stage can hold the GIL longer than it runs. Stacks map
to stages by module and function (:mod:`worker.devtools.bench.stages`). Per image = over the whole
backlog, start-up and shutdown left out.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from worker.config import Settings
from worker.devtools.bench import stages
from worker.devtools.bench.null_model import NullEmbedder
from worker.devtools.bench.pipeline import Workload, fill_backlog, fresh_settings
from worker.devtools.bench.report import Report
from worker.devtools.bench.sampler import ProfilerUnavailable, Sampler, Stack
from worker.devtools.bench.worker_run import ABANDON_S, RowFailed, WorkerRun
from worker.ops.metrics import WorkerMetrics

_COMMENT_MAX = 65533  # bytes of payload one JPEG COM segment can hold
SECTION = "host-cost"
_HOT_FUNCTIONS = 25


@dataclass(frozen=True)
class HostCostWork:
    """The workload of the section: the issue's shape by default (2 partitions, batch 32, 100 ms)."""

    images: int = 4000
    payload_bytes: int = 80_000
    batch_size: int = 32
    decode_workers: int = 2
    partitions: int = 2
    sample_rate: int = 250
    timeout_s: float = 600.0
    kafka_client: str = "kafka-python"


def padded_tiny_jpeg(payload_bytes: int) -> bytes:
    """An 8x8 JPEG made ``payload_bytes`` long by comment segments: the Kafka clients and msgpack handle
    a photo-sized record, the decoder a thumbnail."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    padding = b""
    remaining = max(0, payload_bytes - len(jpeg))
    while remaining > 4:
        size = min(remaining - 4, _COMMENT_MAX)
        padding += b"\xff\xfe" + struct.pack(">H", size + 2) + b"\0" * size
        remaining -= size + 4
    return jpeg[:2] + padding + jpeg[2:]  # after the start-of-image marker


def bench_host_cost(report: Report, bootstrap: str, work: HostCostWork) -> dict[str, Any] | None:
    """Run the section, add its rows and its stage table to ``report``; None if a run failed."""
    payload = padded_tiny_jpeg(work.payload_bytes)
    workload = Workload(
        [payload] * work.images,
        work.batch_size,
        work.decode_workers,
        resize="device",
        partitions=work.partitions,
        timeout_s=work.timeout_s,
        kafka_client=work.kafka_client,
    )
    settings = fresh_settings(bootstrap, workload, log_level="error")
    fill_backlog(settings, workload.corpus)
    knobs: dict[str, Any] = {
        "payload_bytes": len(payload),
        "partitions": work.partitions,
        "batch": work.batch_size,
        "threads": work.decode_workers,
        "kafka_client": work.kafka_client,
    }
    try:
        with worker_warnings_quiet(), tempfile.TemporaryDirectory(prefix="clip-host-cost-") as scratch:
            first = run_null_worker(new_group(settings), work, None)
            # One sampler per run: two at once slowed the worker more than either alone on 2 cores.
            on_cpu = run_null_worker(
                new_group(settings), work, Sampler(Path(scratch) / "cpu.txt", work.sample_rate, False)
            )
            on_gil = run_null_worker(
                new_group(settings), work, Sampler(Path(scratch) / "gil.txt", work.sample_rate, True)
            )
            second = run_null_worker(new_group(settings), work, None)
    except (RowFailed, ProfilerUnavailable) as failure:
        report.add(SECTION, "worker, null model", 0.0, failed=str(failure), **knobs)
        return None
    # Unprofiled before and after the sampled runs: the machine's drift shows as their difference.
    plain = (first.images_per_s + second.images_per_s) / 2
    report.add(
        SECTION,
        "worker, null model, unprofiled (mean of the runs before and after)",
        plain,
        **knobs,
        runs=[round(first.images_per_s, 1), round(second.images_per_s, 1)],
    )
    result = _breakdown(on_cpu, on_gil, work, plain)
    result.update(knobs, images=work.images, unprofiled_images_per_s=round(plain, 1))
    for outcome, what in ((on_cpu, "running threads"), (on_gil, "GIL holder")):
        report.add(
            SECTION,
            f"worker, null model, py-spy sampling the {what}",
            outcome.images_per_s,
            **knobs,
            rate_hz=work.sample_rate,
        )
    report.add(
        SECTION,
        "implied ceiling: GIL saturated (1e6 / host GIL us per image)",
        result["implied_ceiling_images_per_s"],
        gil_us_per_image=result["host"]["gil_us"],
        cpu_us_per_image=result["host"]["cpu_us"],
        without_preemption=result["implied_ceiling_on_cpu_images_per_s"],
    )
    report.host_cost = result
    report.checkpoint()
    return result


@contextlib.contextmanager
def worker_warnings_quiet() -> Iterator[None]:
    """The stand-ins make the worker warn (``--resize device`` on a CPU); nothing a reader should act on."""
    logger = logging.getLogger("worker")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def new_group(settings: Settings) -> Settings:
    """The same settings in a consumer group of their own, which reads the backlog from its start."""
    return settings.model_copy(update={"group_id": f"{settings.group_id}-{uuid.uuid4().hex[:6]}"})


@dataclass
class _Outcome:
    images_per_s: float
    cpu_ns: dict[int, tuple[str, int]]  # native thread id -> (name, CPU time in the run)
    samples: Counter[Stack]


def run_null_worker(settings: Settings, work: HostCostWork, sampler: Sampler | None) -> _Outcome:
    """One worker over the backlog; with a sampler, sampled from before it starts until its last ack."""
    if sampler is not None:
        sampler.start()
    try:
        before = _thread_cpu()
        metrics = WorkerMetrics()
        run = WorkerRun(settings, NullEmbedder(max_batch=work.batch_size), metrics, work.timeout_s).start()
        try:
            run.wait_until(lambda: _count(metrics.consumed) > 0, "the first record to be consumed")
            started = time.perf_counter()
            run.wait_until(
                lambda: _count(metrics.published) >= work.images, "every record to be acknowledged"
            )
            elapsed = time.perf_counter() - started
            after = _thread_cpu()
        except BaseException:
            run.stop(ABANDON_S)
            raise
        samples = sampler.stop() if sampler is not None else Counter()
        run.stop()
    finally:
        if sampler is not None:
            sampler.stop()
    cpu = {tid: (name, ns - before.get(tid, (name, 0))[1]) for tid, (name, ns) in after.items()}
    return _Outcome(work.images / elapsed, cpu, samples)


def _thread_cpu() -> dict[int, tuple[str, int]]:
    """CPU time of every live thread of this process, from the kernel (native id -> name, ns): the Python
    threads, and librdkafka's native ones (which Python does not list)."""
    clocks: dict[int, tuple[str, int]] = _native_client_cpu()
    for thread in threading.enumerate():
        if thread.ident is None or thread.native_id is None:
            continue
        try:
            clock = time.pthread_getcpuclockid(thread.ident)
            clocks[thread.native_id] = (thread.name, time.clock_gettime_ns(clock))
        except (OSError, ProcessLookupError):
            continue  # ended between the listing and the read
    return clocks


def _native_client_cpu() -> dict[int, tuple[str, int]]:
    """CPU time of librdkafka's native threads (kernel names ``rdk:*``), from ``/proc``: clock ticks, so
    10 ms grains, fine over a run of seconds."""
    tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    clocks: dict[int, tuple[str, int]] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            if not name.startswith(stages.NATIVE_CLIENT_THREADS):
                continue
            # The name in parentheses may hold spaces: the fields after it are split from its end.
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended between the listing and the read
        clocks[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) * tick_ns)  # utime + stime
    return clocks


def _count(counter: Any) -> float:
    return float(counter._value.get())


def _breakdown(
    on_cpu: _Outcome, on_gil: _Outcome, work: HostCostWork, unprofiled_rate: float
) -> dict[str, Any]:
    """Per-stage CPU and GIL microseconds per image, the floor, the ceiling and the cross-checks."""
    period_us = 1e6 / work.sample_rate
    per_image = 1 / work.images
    gil_us: dict[str, float] = defaultdict(float)
    own: Counter[tuple[str, str]] = Counter()  # (stage, innermost function) -> GIL samples
    kafka_gil_us = 0.0
    for stack, count in on_gil.samples.items():
        stage, in_kafka = stages.classify(stack.frames, stack.thread_name)
        gil_us[stage] += count * period_us * per_image
        if stack.frames and stage not in stages.LEFT_OUT_STAGES:
            innermost = stack.frames[-1]
            own[stage, f"{stages.module_of(innermost.path)}:{innermost.function}"] += count
        if in_kafka:
            kafka_gil_us += count * period_us * per_image
    cpu_us, sampled_us, kernel_us = _cpu_by_stage(on_cpu, period_us)
    cpu_us = {stage: value * per_image for stage, value in cpu_us.items()}
    host_gil = sum(gil_us.get(s, 0.0) for s in stages.HOST_STAGES)
    host_cpu = sum(cpu_us.get(s, 0.0) for s in stages.HOST_STAGES)
    # The GIL a stage holds while it runs cannot exceed its CPU time; the rest is its holder waiting for a
    # core with the GIL in hand (preempted), which a crowded machine adds and a dedicated host would not.
    held_on_cpu = {s: min(gil_us.get(s, 0.0), cpu_us.get(s, 0.0)) for s in stages.HOST_STAGES}
    host_on_cpu = sum(held_on_cpu.values())
    rows: list[dict[str, Any]] = []
    for stage in (*stages.HOST_STAGES, *stages.STAND_IN_STAGES):
        gil = gil_us.get(stage, 0.0)
        counted = host_gil and stage in stages.HOST_STAGES
        rows.append(
            {
                "stage": stage,
                "cpu_us": round(cpu_us.get(stage, 0.0), 1),
                "gil_us": round(gil, 1),
                "gil_on_cpu_us": round(min(gil, cpu_us.get(stage, 0.0)), 1),
                "gil_share": round(gil / host_gil, 3) if counted else None,
            }
        )
    all_gil = host_gil + sum(gil_us.get(s, 0.0) for s in stages.STAND_IN_STAGES)
    wall_us = 1e6 / unprofiled_rate
    return {
        "stages": rows,
        "host": {
            "cpu_us": round(host_cpu, 1),
            "gil_us": round(host_gil, 1),
            "gil_on_cpu_us": round(host_on_cpu, 1),
        },
        "implied_ceiling_images_per_s": round(1e6 / host_gil, 1) if host_gil else 0.0,
        "implied_ceiling_on_cpu_images_per_s": round(1e6 / host_on_cpu, 1) if host_on_cpu else 0.0,
        "kafka_python_floor": {
            "consumer": _sum_stages(cpu_us, gil_us, stages.KAFKA_CONSUMER_STAGES),
            "producer": _sum_stages(cpu_us, gil_us, stages.KAFKA_PRODUCER_STAGES),
            "gil_us_own_code": round(kafka_gil_us, 1),
        },
        "left_out": {s: round(gil_us.get(s, 0.0), 1) for s in stages.LEFT_OUT_STAGES},
        # Where the GIL time is spent, by the function on top of the stack: what a fix would target.
        "hot_functions": [
            {"stage": stage, "function": function, "gil_us": round(count * period_us * per_image, 1)}
            for (stage, function), count in own.most_common(_HOT_FUNCTIONS)
        ],
        "cross_check": {
            "wall_us_per_image": round(wall_us, 1),
            "gil_busy_at_unprofiled_rate": round(all_gil / wall_us, 3),
            "sampler_coverage_of_kernel_cpu": round(sampled_us / kernel_us, 3) if kernel_us else None,
            "worker_cpu_us_per_image_kernel": round(kernel_us * per_image, 1),
        },
        "sample_rate_hz": work.sample_rate,
    }


def _sum_stages(
    cpu_us: dict[str, float], gil_us: dict[str, float], names: tuple[str, ...]
) -> dict[str, float]:
    return {
        "cpu_us": round(sum(cpu_us.get(s, 0.0) for s in names), 1),
        "gil_us": round(sum(gil_us.get(s, 0.0) for s in names), 1),
    }


def _cpu_by_stage(outcome: _Outcome, period_us: float) -> tuple[dict[str, float], float, float]:
    """Each worker thread's kernel CPU time (us) split over stages by its CPU samples; also the sampled
    and the kernel CPU time of the worker's threads, whose ratio says how well the samples cover it."""
    per_thread: dict[int, Counter[str]] = defaultdict(Counter)
    names: dict[int, str] = {}
    for stack, count in outcome.samples.items():
        if stages.is_waiting(stack.frames):
            continue  # py-spy can count a thread as running while it enters or leaves a wait
        stage, _ = stages.classify(stack.frames, stack.thread_name)
        per_thread[stack.thread_id][stage] += count
        names[stack.thread_id] = stack.thread_name
    by_stage: dict[str, float] = defaultdict(float)
    sampled = kernel = 0.0
    for tid, (name, ns) in outcome.cpu_ns.items():
        thread_us = ns / 1000
        counts = per_thread.get(tid)
        if name in stages.HARNESS_THREADS:
            by_stage[stages.HARNESS] += thread_us
            continue
        if name.startswith(stages.NATIVE_CLIENT_THREADS):
            by_stage[stages.NATIVE_CLIENT] += thread_us
            kernel += thread_us
            sampled += thread_us  # no Python frames to sample: its kernel time is its own stage entire
            continue
        kernel += thread_us
        if not counts:
            by_stage[stages.OTHER] += thread_us
            continue
        total = sum(counts.values())
        sampled += total * period_us
        for stage, count in counts.items():
            by_stage[stage] += thread_us * count / total
    return by_stage, sampled, kernel
