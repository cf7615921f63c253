"""Runs ``clip-worker bench``: model, preprocessing and end-to-end throughput and the baseline, in one run."""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from worker.bench.model import bench_model
from worker.bench.parity import bench_parity
from worker.bench.pipeline import Workload, bench_bare, bench_baseline, bench_worker
from worker.bench.preprocess import bench_device_preprocess, bench_large_jpegs, bench_preprocess
from worker.bench.report import Report, machine_facts
from worker.bench.soak import bench_soak
from worker.brokers import TansuBroker
from worker.config import Settings
from worker.embedder import Embedder, ModelSpec, configure_cpu_threads, default_decode_workers, load_embedder
from worker.samples import jpeg_corpus
from worker.tiny_model import build_tiny_clip

T = TypeVar("T")


def _load(args: argparse.Namespace, workdir: Path) -> Embedder:
    if args.model == "tiny":
        directory = build_tiny_clip(workdir / "tiny-224", image_size=224, patch_size=32)
        return load_embedder(ModelSpec(model=str(directory), device=args.device, dtype=args.dtype))
    return load_embedder(
        ModelSpec(model=args.model, random_weights=args.random_weights, device=args.device, dtype=args.dtype)
    )


def _with_dtype(embedder: Embedder, dtype: str | None) -> Embedder:
    wanted = getattr(torch, dtype) if dtype else embedder.dtype
    if wanted == embedder.dtype:
        return embedder
    model = copy.deepcopy(embedder.model).to(wanted)
    return Embedder(model, embedder.label, embedder.revision, embedder.preprocessing, embedder.device, wanted)


def run_bench(args: argparse.Namespace) -> int:
    """Run the selected sections, print the table, write JSON."""
    if args.quick:
        args.images, args.seconds, args.batch_sizes, args.threads = 96, 1.0, "1,8", "1,2"
    sections = set(args.sections.split(","))
    report = Report(machine=machine_facts())
    decode_workers = args.decode_workers or default_decode_workers()
    # The same torch thread count the worker will use, for every section, so the runs compare fairly.
    report.machine["torch_threads"] = configure_cpu_threads(0, decode_workers)
    with tempfile.TemporaryDirectory(prefix="clip-bench-") as scratch:
        embedder = _load(args, Path(scratch))
        report.machine.update(
            model=embedder.label,
            dtype=str(embedder.dtype).removeprefix("torch."),
            device=str(embedder.device),
        )
        print(
            f"clip-worker bench: {embedder.label} on {embedder.device} ({report.machine['dtype']}), "
            f"{report.machine['cpu_cores']} CPU cores, GPU {report.machine['gpu']}"
        )
        corpus = jpeg_corpus(min(args.images, 64), 500, 375) * (args.images // 64 + 1)
        corpus = corpus[: args.images]
        if "model" in sections:
            sizes = [int(b) for b in args.batch_sizes.split(",")]
            for dtype in args.dtypes.split(",") if args.dtypes else [None]:
                bench_model(report, _with_dtype(embedder, dtype), sizes, args.seconds)
                if args.compile != "off":
                    bench_model(report, _with_dtype(embedder, dtype), sizes, args.seconds, args.compile)
        if "preprocess" in sections:
            bench_preprocess(
                report, corpus, embedder.preprocessing, [int(t) for t in args.threads.split(",")]
            )
            bench_large_jpegs(report, embedder.preprocessing, 16 if args.quick else 48)
            bench_device_preprocess(report, embedder, corpus, args.batch_size)
        if "parity" in sections:
            bench_parity(report, embedder, args.parity_images)
        if "end-to-end" in sections:
            default_resize = "device" if args.decode == "device" else Settings.model_fields["resize"].default
            resize = args.resize or default_resize
            work = Workload(corpus, args.batch_size, decode_workers, resize, args.decode)
            _end_to_end(report, embedder, work, args.bootstrap_servers, args.exactly_once, args.compile)
        if "soak" in sections:
            small = jpeg_corpus(64, 160, 120) * (args.soak_messages // 64 + 1)
            soak_work = Workload(
                small[: args.soak_messages],
                args.batch_size,
                decode_workers,
                args.resize or Settings.model_fields["resize"].default,
            )
            _with_broker(
                args.bootstrap_servers,
                lambda servers: bench_soak(report, embedder, soak_work, servers, args.max_in_flight),
            )
    print("\n" + report.table())
    output = args.output or Path("bench-results") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report.save(output)
    print(f"\nresults written to {output}")
    return 0


def _with_broker(bootstrap: str | None, action: Callable[[str], T]) -> T:
    if bootstrap:
        return action(bootstrap)
    with TansuBroker() as broker:
        return action(broker.bootstrap_servers)


def _end_to_end(
    report: Report,
    embedder: Embedder,
    work: Workload,
    bootstrap: str | None,
    exactly_once: bool,
    compile_mode: str,
) -> None:
    bare = bench_bare(report, embedder, work)
    rates = _with_broker(
        bootstrap,
        lambda servers: _pipeline_runs(report, embedder, work, servers, exactly_once, compile_mode),
    )
    report.ratios["end-to-end / bare work"] = round(rates["worker"] / bare, 3)
    report.ratios["end-to-end / baseline"] = round(rates["worker"] / rates["baseline"], 3)
    if exactly_once:
        report.ratios["exactly-once / at-least-once"] = round(rates["exactly-once"] / rates["worker"], 3)
    if compile_mode != "off":
        report.ratios[f"--compile {compile_mode} / eager"] = round(rates["compiled"] / rates["worker"], 3)


def _pipeline_runs(
    report: Report,
    embedder: Embedder,
    work: Workload,
    bootstrap: str,
    exactly_once: bool,
    compile_mode: str,
) -> dict[str, float]:
    """images/s of the worker, optionally its exactly-once and compiled runs, and the baseline."""
    rates = {"worker": bench_worker(report, embedder, work, bootstrap)}
    if exactly_once:
        rates["exactly-once"] = bench_worker(report, embedder, work, bootstrap, exactly_once=True)
    if compile_mode != "off":
        rates["compiled"] = bench_worker(report, embedder.view(), work, bootstrap, compile_mode=compile_mode)
    rates["baseline"] = bench_baseline(report, _with_dtype(embedder, "float32"), work, bootstrap)
    return rates
