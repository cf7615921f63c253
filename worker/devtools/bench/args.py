"""Flags of ``clip-worker bench``, kept free of heavy imports so the CLI starts fast."""

from __future__ import annotations

import argparse
from pathlib import Path

SECTIONS = (
    "model",
    "preprocess",
    "end-to-end",
    "parity",
    "fidelity",
    "soak",
    "host-cost",
    "host-ceiling",
    "reference-memory",
    "fetch-cost",
    "serve",
)
# End-to-end runs, in the order they run: the bare work, the worker (eager), the worker fetching the same
# images by reference from a local HTTP server, the worker with --decode device --resize device, the NeMo
# Curator-style baseline, the worker compiled, the worker exactly-once.
E2E_RUNS = ("bare", "worker", "by-reference", "nvjpeg", "baseline", "compiled", "exactly-once")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``clip-worker bench``."""
    parser.add_argument("--quick", action="store_true", help="about a minute: small corpus, few cases")
    parser.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (cheap model, real 224 px preprocessing), a hub id or a directory; the serve section "
        "also takes 'vit-l14-shape' (ViT-L/14's towers with random weights, offline)",
    )
    parser.add_argument("--random-weights", action="store_true", help="random weights for --model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,8,32,128", help="model section batch sizes")
    parser.add_argument(
        "--dtypes", default=None, help="model section dtypes, e.g. bfloat16,float32 (default --dtype)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the end-to-end runs")
    parser.add_argument("--threads", default="1,2,4", help="decode thread counts for the preprocess section")
    parser.add_argument("--decode-workers", type=int, default=0, help="worker decode threads (0 = cores)")
    parser.add_argument("--images", type=int, default=2000, help="corpus size for preprocess and end-to-end")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per model case")
    parser.add_argument(
        "--sections", default="model,preprocess,end-to-end", help="subset of " + ",".join(SECTIONS)
    )
    parser.add_argument("--soak-messages", type=int, default=100_000, help="backlog of the soak section")
    parser.add_argument("--max-in-flight", type=int, default=2048, help="in-flight cap during the soak")
    parser.add_argument("--parity-images", type=int, default=24, help="images compared in the parity section")
    parser.add_argument(
        "--fidelity-images", type=int, default=64, help="fidelity section: images for bfloat16 vs float32"
    )
    parser.add_argument(
        "--preprocess-images", type=int, default=0, help="preprocess section corpus (0 = --images)"
    )
    parser.add_argument(
        "--e2e-runs",
        default=None,
        help="end-to-end runs, a subset of "
        + ",".join(E2E_RUNS)
        + " (default: bare,worker,by-reference,baseline, "
        "plus compiled with --compile and exactly-once with --exactly-once)",
    )
    parser.add_argument(
        "--baseline-images", type=int, default=0, help="records the baseline measures (0 = --images)"
    )
    parser.add_argument(
        "--row-timeout",
        type=float,
        default=600.0,
        help="seconds an end-to-end or soak row may take, start-up and compile included, before it fails",
    )
    parser.add_argument(
        "--gpu-samples",
        type=Path,
        default=None,
        help="CSV written by `python -m worker.devtools.bench.gpu_busy`: end-to-end rows report GPU busy",
    )
    parser.add_argument(
        "--resize",
        default=None,
        choices=("pil", "torch", "device"),
        help="resize path (default: the worker's)",
    )
    parser.add_argument(
        "--decode",
        default="pil",
        choices=("pil", "device"),
        help="end-to-end: JPEG decoding on the decode threads or the model's device (needs --resize device)",
    )
    parser.add_argument(
        "--compile",
        default="off",
        choices=("off", "inductor", "cuda-graphs"),
        help="compile once at --batch-size: a compiled model row, and the end-to-end 'compiled' run",
    )
    parser.add_argument(
        "--exactly-once",
        action="store_true",
        help="end-to-end section: also run the worker in --exactly-once mode (timed until committed)",
    )
    parser.add_argument("--partitions", type=int, default=4, help="end-to-end: partitions of the input topic")
    parser.add_argument(
        "--fetch-latency-ms",
        type=float,
        default=200.0,
        help="by-reference run: latency the local HTTP server adds before each image",
    )
    parser.add_argument(
        "--fetch-concurrency", type=int, default=0, help="by-reference run: the worker's (0 = its default)"
    )
    parser.add_argument(
        "--reference-images",
        type=int,
        default=10_000,
        help="reference-memory section: references in the backlog",
    )
    parser.add_argument(
        "--reference-image-mb", type=float, default=5.0, help="reference-memory section: size of each image"
    )

    parser.add_argument(
        "--image-widths",
        default="500",
        help="end-to-end and preprocess corpus: a width or a range MIN-MAX spread over the distinct images "
        "(height 3/4 of it), e.g. 480-800",
    )
    parser.add_argument("--jpeg-quality", type=int, default=90, help="quality of the corpus JPEGs")
    parser.add_argument(
        "--serve-clients", default="1,16,64", help="serve section: concurrent clients of the text rows"
    )
    parser.add_argument(
        "--serve-image-clients", default="1,16,64", help="serve section: concurrent clients of the image rows"
    )
    parser.add_argument(
        "--serve-batch-size", type=int, default=64, help="serve section: batch size, batching on"
    )
    parser.add_argument(
        "--serve-batch-timeout-ms", type=int, default=10, help="serve section: batch timeout, batching on"
    )
    parser.add_argument("--fetches", type=int, default=6000, help="fetch-cost section: fetches measured")
    parser.add_argument(
        "--host-cost-images", type=int, default=4000, help="host-cost section: records in the backlog"
    )
    parser.add_argument(
        "--payload-bytes", type=int, default=80_000, help="host-cost section: bytes of each image record"
    )
    parser.add_argument(
        "--host-cost-partitions", type=int, default=2, help="host-cost section: input topic partitions"
    )
    parser.add_argument(
        "--sample-rate", type=int, default=250, help="host-cost section: py-spy samples per second"
    )
    parser.add_argument(
        "--bootstrap-servers",
        default=None,
        help="use this broker for end-to-end runs (default: a local Tansu broker)",
    )
    parser.add_argument(
        "--ceiling-records", type=int, default=4000, help="host-ceiling section: records in the backlog"
    )
    parser.add_argument(
        "--ceiling-payload-bytes", type=int, default=50_000, help="host-ceiling section: bytes of each record"
    )
    parser.add_argument(
        "--ceiling-runs",
        type=int,
        default=3,
        help="host-ceiling section: runs per row (the median is reported)",
    )
    parser.add_argument(
        "--kafka-client",
        default="kafka-python",
        choices=("kafka-python", "librdkafka"),
        help="the Kafka client of every row that goes through a broker (the worker's --kafka-client); "
        "host-ceiling runs both",
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON results (default bench-results/)")
