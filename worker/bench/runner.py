"""Runs ``clip-worker bench``: model, preprocessing and end-to-end throughput and the baseline, in one run."""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch

from worker.bench.model import bench_model
from worker.bench.parity import bench_parity
from worker.bench.pipeline import Workload, bench_bare, bench_baseline, bench_worker
from worker.bench.preprocess import bench_preprocess
from worker.bench.report import Report, machine_facts
from worker.brokers import TansuBroker
from worker.config import Settings
from worker.embedder import Embedder, ModelSpec, load_embedder
from worker.samples import jpeg_corpus
from worker.tiny_model import build_tiny_clip


def _load(args: argparse.Namespace, workdir: Path) -> Embedder:
    if args.model == "tiny":
        directory = build_tiny_clip(workdir / "tiny-224", image_size=224, patch_size=32)
        return load_embedder(ModelSpec(model=str(directory), device=args.device, dtype=args.dtype))
    return load_embedder(
        ModelSpec(model=args.model, random_weights=args.random_weights, device=args.device, dtype=args.dtype)
    )


def _float32_copy(embedder: Embedder) -> Embedder:
    if embedder.dtype == torch.float32:
        return embedder
    model = copy.deepcopy(embedder.model).float()
    return Embedder(
        model, embedder.label, embedder.revision, embedder.preprocessing, embedder.device, torch.float32
    )


def run_bench(args: argparse.Namespace) -> int:
    """Run the selected sections, print the table, write JSON."""
    if args.quick:
        args.images, args.seconds, args.batch_sizes, args.threads = 96, 1.0, "1,8", "1,2"
    sections = set(args.sections.split(","))
    report = Report(machine=machine_facts())
    decode_workers = args.decode_workers or max(1, min(8, os.cpu_count() or 1))
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
            bench_model(report, embedder, [int(b) for b in args.batch_sizes.split(",")], args.seconds)
        if "preprocess" in sections:
            bench_preprocess(
                report, corpus, embedder.preprocessing, [int(t) for t in args.threads.split(",")]
            )
        if "parity" in sections:
            bench_parity(report, embedder, args.parity_images)
        if "end-to-end" in sections:
            resize = args.resize or Settings.model_fields["resize"].default
            work = Workload(corpus, args.batch_size, decode_workers, resize)
            _end_to_end(report, embedder, work, args.bootstrap_servers)
    print("\n" + report.table())
    output = args.output or Path("bench-results") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report.save(output)
    print(f"\nresults written to {output}")
    return 0


def _end_to_end(report: Report, embedder: Embedder, work: Workload, bootstrap: str | None) -> None:
    bare = bench_bare(report, embedder, work)
    if bootstrap:
        ours, baseline = _pipeline_pair(report, embedder, work, bootstrap)
    else:
        with TansuBroker() as broker:
            ours, baseline = _pipeline_pair(report, embedder, work, broker.bootstrap_servers)
    report.ratios["end-to-end / bare work"] = round(ours / bare, 3)
    report.ratios["end-to-end / baseline"] = round(ours / baseline, 3)


def _pipeline_pair(report: Report, embedder: Embedder, work: Workload, bootstrap: str) -> tuple[float, float]:
    ours = bench_worker(report, embedder, work, bootstrap)
    baseline = bench_baseline(report, _float32_copy(embedder), work, bootstrap)
    return ours, baseline
