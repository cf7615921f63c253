"""Runs ``clip-worker bench``: model, preprocessing and end-to-end throughput and the baseline, in one run."""

from __future__ import annotations

import argparse
import io
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TypeVar

from worker.config import Settings
from worker.devtools.bench.args import E2E_RUNS
from worker.devtools.bench.by_reference import bench_by_reference, bench_reference_memory
from worker.devtools.bench.fetch_cost import bench_fetch_cost
from worker.devtools.bench.fidelity import bench_dtype_fidelity, with_dtype
from worker.devtools.bench.host_ceiling import CeilingWork, bench_host_ceiling
from worker.devtools.bench.host_cost import HostCostWork, bench_host_cost
from worker.devtools.bench.model import bench_copy, bench_model
from worker.devtools.bench.parity import bench_parity
from worker.devtools.bench.pipeline import Workload, bench_bare, bench_baseline, bench_worker
from worker.devtools.bench.preprocess import (
    bench_device_preprocess,
    bench_large_jpegs,
    bench_preprocess,
    device_decoding_available,
)
from worker.devtools.bench.report import Report, machine_facts
from worker.devtools.bench.serve import bench_serve
from worker.devtools.bench.soak import bench_soak
from worker.devtools.brokers import TansuBroker
from worker.devtools.samples import jpeg_corpus, scene
from worker.devtools.tiny_model import build_tiny_clip
from worker.errors import StartupError
from worker.fetching.fetcher import FetchPolicy
from worker.inference.embedder import (
    Embedder,
    ModelSpec,
    configure_cpu_threads,
    default_decode_workers,
    load_embedder,
)

T = TypeVar("T")


def _load(args: argparse.Namespace, workdir: Path) -> Embedder:
    if args.model == "tiny":
        directory = build_tiny_clip(workdir / "tiny-224", image_size=224, patch_size=32)
        return load_embedder(ModelSpec(model=str(directory), device=args.device, dtype=args.dtype))
    return load_embedder(
        ModelSpec(model=args.model, random_weights=args.random_weights, device=args.device, dtype=args.dtype)
    )


def e2e_runs(args: argparse.Namespace) -> list[str]:
    """The end-to-end runs asked for, in :data:`E2E_RUNS` order."""
    if args.e2e_runs:
        wanted = set(args.e2e_runs.split(","))
        unknown = wanted - set(E2E_RUNS)
        if unknown:
            raise StartupError(f"--e2e-runs: unknown {sorted(unknown)}; pick from {','.join(E2E_RUNS)}")
    else:
        wanted = {"bare", "worker", "by-reference", "baseline"}
        wanted |= {"compiled"} if args.compile != "off" else set()
        wanted |= {"exactly-once"} if args.exactly_once else set()
    return [run for run in E2E_RUNS if run in wanted]


class _Compiled:
    """One compiled view of the embedder at the end-to-end batch size, compiled when first needed and then
    shared by the compiled model row and the compiled end-to-end run (compiling ViT-L/14 takes minutes)."""

    def __init__(self, embedder: Embedder, mode: str, batch_size: int) -> None:
        self.mode = mode
        self.batch_size = batch_size
        self._embedder = embedder
        self._view: Embedder | None = None
        self.error: str | None = None
        self.seconds = 0.0

    def get(self) -> Embedder | None:
        """The compiled view, or None if compiling failed (:attr:`error` says why)."""
        if self._view is None and self.error is None:
            view = self._embedder.view()
            try:
                self.seconds = view.compile(self.mode, self.batch_size)
            except Exception as exc:
                self.error = f"compiling failed: {type(exc).__name__}: {str(exc)[:300]}"
                return None
            self._view = view
        return self._view

    def model_row(self, report: Report, seconds: float) -> None:
        """The forward pass alone, compiled, at the compiled batch size."""
        view = self.get()
        case = f"batch {self.batch_size}, forward pass, --compile {self.mode}"
        if view is None:
            report.add("model", case, 0.0, failed=self.error)
            return
        detail = {
            "compile": self.mode,
            "compile_s": round(self.seconds),
            "graphs_skipped": view.graphs_skipped,
        }
        bench_model(report, view, [self.batch_size], seconds, **detail)


# Sections that load no model here: host-cost runs a stand-in, fetch-cost only fetches, serve's server process
# loads its own.
_MODEL_FREE = frozenset({"host-cost", "host-ceiling", "fetch-cost", "serve"})


def run_bench(args: argparse.Namespace) -> int:
    """Run the selected sections, print the table, write JSON after every row; 1 if any row failed."""
    # A step timeout's SIGTERM unwinds like Ctrl-C: the local broker is stopped, not orphaned.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    if args.quick:
        args.images, args.seconds, args.batch_sizes, args.threads = 96, 1.0, "1,8", "1,2"
        args.host_cost_images = min(args.host_cost_images, 400)
    sections = set(args.sections.split(","))
    runs = e2e_runs(args)
    output = args.output or Path("bench-results") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = Report(machine=machine_facts(), output=output)
    decode_workers = args.decode_workers or default_decode_workers()
    # The same torch thread count the worker will use, for every section, so the runs compare fairly.
    report.machine["torch_threads"] = configure_cpu_threads(0, decode_workers)
    report.machine["kafka_client"] = args.kafka_client
    with tempfile.TemporaryDirectory(prefix="clip-bench-") as scratch:
        if sections - _MODEL_FREE:
            _model_sections(args, report, sections, runs, decode_workers, Path(scratch))
        if "serve" in sections:
            bench_serve(report, args, Path(scratch))
        if "fetch-cost" in sections:
            concurrency = args.fetch_concurrency or FetchPolicy().concurrency
            bench_fetch_cost(report, _corpus(args), args.fetches, concurrency)
        if "host-cost" in sections:
            work = HostCostWork(
                images=args.host_cost_images,
                payload_bytes=args.payload_bytes,
                batch_size=args.batch_size,
                decode_workers=decode_workers,
                partitions=args.host_cost_partitions,
                sample_rate=args.sample_rate,
                timeout_s=args.row_timeout,
                kafka_client=args.kafka_client,
            )
            _with_broker(args.bootstrap_servers, lambda servers: bench_host_cost(report, servers, work))
        if "host-ceiling" in sections:
            ceiling = CeilingWork(
                records=200 if args.quick else args.ceiling_records,
                payload_bytes=args.ceiling_payload_bytes,
                batch_size=args.batch_size,
                decode_workers=decode_workers,
                partitions=args.host_cost_partitions,
                runs=1 if args.quick else args.ceiling_runs,
                timeout_s=args.row_timeout,
            )
            _with_broker(args.bootstrap_servers, lambda servers: bench_host_ceiling(report, servers, ceiling))
    print("\n" + report.table())
    report.save(output)
    print(f"\nresults written to {output}")
    failures = report.failures()
    for row in failures:
        print(f"FAILED ROW: {row.section} / {row.case}: {row.failed}")
    return 1 if failures else 0


def _model_sections(
    args: argparse.Namespace,
    report: Report,
    sections: set[str],
    runs: list[str],
    decode_workers: int,
    scratch: Path,
) -> None:
    """Every section that loads the model (all but host-cost)."""
    embedder = _load(args, scratch)
    report.machine.update(
        model=embedder.label,
        dtype=str(embedder.dtype).removeprefix("torch."),
        device=str(embedder.device),
        batch_size=args.batch_size,
    )
    report.checkpoint()
    print(
        f"clip-worker bench: {embedder.label} on {embedder.device} ({report.machine['dtype']}), "
        f"{report.machine['cpu_cores']} CPU cores, GPU {report.machine['gpu']}"
    )
    corpus = _corpus(args)
    compiled = _Compiled(embedder, args.compile, args.batch_size)
    if "model" in sections:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        for dtype in args.dtypes.split(",") if args.dtypes else [None]:
            bench_model(report, with_dtype(embedder, dtype), sizes, args.seconds)
        bench_copy(report, embedder, sizes, args.seconds / 2)
        if args.compile != "off" and not ("end-to-end" in sections and "compiled" in runs):
            compiled.model_row(report, args.seconds)
    if "fidelity" in sections:
        bench_dtype_fidelity(report, embedder, args.fidelity_images)
    if "parity" in sections:
        bench_parity(report, embedder, args.parity_images)
    if "preprocess" in sections:
        few = corpus[: args.preprocess_images or len(corpus)]
        bench_preprocess(report, few, embedder, [int(t) for t in args.threads.split(",")])
        bench_large_jpegs(report, embedder.preprocessing, 16 if args.quick else 48)
        bench_device_preprocess(report, embedder, few, args.batch_size)
    if "end-to-end" in sections:
        default_resize = "device" if args.decode == "device" else Settings.model_fields["resize"].default
        work = Workload(
            corpus,
            args.batch_size,
            decode_workers,
            args.resize or default_resize,
            args.decode,
            partitions=args.partitions,
            timeout_s=args.row_timeout,
            gpu_samples=args.gpu_samples,
            kafka_client=args.kafka_client,
        )
        stages = _EndToEnd(report, embedder, work, compiled, args, with_model_row="model" in sections)
        _with_broker(args.bootstrap_servers, lambda servers: stages.run(runs, servers))
    if "reference-memory" in sections:
        memory_work = Workload(
            [], args.batch_size, decode_workers, args.resize or Settings.model_fields["resize"].default,
            timeout_s=args.row_timeout, kafka_client=args.kafka_client,
        )  # fmt: skip
        _with_broker(
            args.bootstrap_servers,
            lambda servers: bench_reference_memory(
                report,
                embedder,
                memory_work,
                servers,
                args.reference_images,
                args.reference_image_mb,
                args.max_in_flight,
                args.fetch_concurrency,
            ),
        )
    if "soak" in sections:
        small = jpeg_corpus(64, 160, 120) * (args.soak_messages // 64 + 1)
        soak_work = Workload(
            small[: args.soak_messages],
            args.batch_size,
            decode_workers,
            args.resize or Settings.model_fields["resize"].default,
            timeout_s=args.row_timeout,
            kafka_client=args.kafka_client,
        )
        _with_broker(
            args.bootstrap_servers,
            lambda servers: bench_soak(report, embedder, soak_work, servers, args.max_in_flight),
        )


def _corpus(args: argparse.Namespace) -> list[bytes]:
    """``--images`` JPEGs from at most 64 distinct pictures, their widths spread over ``--image-widths``."""
    low, _, high = args.image_widths.partition("-")
    widest = int(high or low)
    distinct: int = min(args.images, 64)
    if widest == int(low) and args.jpeg_quality == 90:
        pictures: list[bytes] = jpeg_corpus(distinct, widest, widest * 3 // 4)
    else:
        pictures = []
        for index in range(distinct):
            width = int(low) + (widest - int(low)) * index // max(1, distinct - 1)
            buffer = io.BytesIO()
            scene(width, width * 3 // 4, index).save(buffer, format="JPEG", quality=args.jpeg_quality)
            pictures.append(buffer.getvalue())
    count: int = args.images
    corpus: list[bytes] = pictures * (count // distinct + 1)
    return corpus[:count]


def _terminated(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _with_broker(bootstrap: str | None, action: Callable[[str], T]) -> T:
    if bootstrap:
        return action(bootstrap)
    with TansuBroker() as broker:
        return action(broker.bootstrap_servers)


class _EndToEnd:
    """The end-to-end runs on one broker, in order, and the ratios between those that succeeded."""

    def __init__(
        self,
        report: Report,
        embedder: Embedder,
        work: Workload,
        compiled: _Compiled,
        args: argparse.Namespace,
        with_model_row: bool,
    ) -> None:
        self.report, self.embedder, self.work, self.compiled = report, embedder, work, compiled
        self.args = args
        self.with_model_row = with_model_row
        self.rates: dict[str, float | None] = {}
        self.steady_rates: dict[str, float] = {}

    def run(self, runs: list[str], bootstrap: str) -> None:
        for name in runs:
            rows = len(self.report.rows)
            self.rates[name] = self._one(name, bootstrap)
            steady = self.report.rows[-1].detail.get("steady_img_s") if len(self.report.rows) > rows else None
            if self.rates[name] and steady:
                self.steady_rates[name] = float(steady)
        self._ratios()

    def _one(self, name: str, bootstrap: str) -> float | None:
        report, embedder, work = self.report, self.embedder, self.work
        if name == "bare":
            return bench_bare(report, embedder, work)
        if name == "worker":
            return bench_worker(report, embedder, work, bootstrap)
        if name == "by-reference":
            latency_s = self.args.fetch_latency_ms / 1000
            return bench_by_reference(
                report, embedder, work, bootstrap, latency_s, self.args.fetch_concurrency
            )
        if name == "nvjpeg":
            if not device_decoding_available():
                return None
            on_device = replace(work, decode="device", resize="device")
            return bench_worker(report, embedder, on_device, bootstrap, label=", --decode device")
        if name == "baseline":
            fp32 = with_dtype(embedder, "float32")
            return bench_baseline(report, fp32, work, bootstrap, self.args.baseline_images)
        if name == "exactly-once":
            return bench_worker(report, embedder, work, bootstrap, exactly_once=True)
        # compiled: the model row first (it compiles), then the worker on the same compiled view
        if self.with_model_row:
            self.compiled.model_row(report, self.args.seconds)
        view = self.compiled.get()
        if view is None:
            case = f"clip-worker, batch {work.batch_size}, --compile {self.compiled.mode}"
            report.add("end-to-end", case, 0.0, failed=self.compiled.error)
            return None
        return bench_worker(report, view, work, bootstrap, compile_mode=self.compiled.mode)

    def _ratios(self) -> None:
        pairs = {
            "end-to-end / bare work": ("worker", "bare"),
            "end-to-end / baseline": ("worker", "baseline"),
            "by reference / by bytes": ("by-reference", "worker"),
            "exactly-once / at-least-once": ("exactly-once", "worker"),
            f"--compile {self.compiled.mode} / eager": ("compiled", "worker"),
            "--decode device / host decode": ("nvjpeg", "worker"),
        }
        for name, (top, bottom) in pairs.items():
            above, below = self.rates.get(top), self.rates.get(bottom)
            if above and below:
                self.report.ratios[name] = round(above / below, 3)
        # Fetching adds a round trip before the first image and after the last: the steady rates say what
        # concurrency hides once the pipeline is full.
        above, below = self.steady_rates.get("by-reference"), self.steady_rates.get("worker")
        if above and below:
            self.report.ratios["by reference / by bytes, steady (10-90% of the backlog)"] = round(
                above / below, 3
            )
        self.report.checkpoint()
