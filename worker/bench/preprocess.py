"""Decode + preprocessing throughput per thread count, ours against the reference processor."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial

import numpy as np

from worker.bench.report import Report
from worker.images import RESIZERS, ImageLimits, Preprocessing, decode_and_preprocess, load_rgb


def reference_processor(params: Preprocessing) -> object:
    """transformers' CLIPImageProcessor with the PIL backend (the parity reference)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as Processor
    return Processor(
        size={"shortest_edge": params.size},
        crop_size={"height": params.crop, "width": params.crop},
        image_mean=list(params.mean),
        image_std=list(params.std),
    )


def reference_pixels(processor: object, data: bytes) -> np.ndarray:
    """Reference preprocessing of one encoded image (NeMo Curator's per-image path)."""
    image = load_rgb(data, ImageLimits())
    pixels: np.ndarray = processor(images=image, return_tensors="np")["pixel_values"][0]  # type: ignore[operator]
    return pixels


def bench_preprocess(report: Report, corpus: list[bytes], params: Preprocessing, workers: list[int]) -> None:
    """Images/s of decode + preprocess over ``corpus`` with 1..N threads, and the reference on one thread."""
    limits = ImageLimits()
    processor = reference_processor(params)
    started = time.perf_counter()
    for data in corpus:
        reference_pixels(processor, data)
    report.add(
        "preprocess", "reference CLIPImageProcessor, 1 thread", len(corpus) / (time.perf_counter() - started)
    )
    for resize in RESIZERS:
        ours = replace(params, resize=resize)
        for count in workers:
            with ThreadPoolExecutor(max_workers=count) as pool:
                work = partial(decode_and_preprocess, limits=limits, params=ours)
                list(pool.map(work, corpus[:count]))
                started = time.perf_counter()
                list(pool.map(work, corpus))
                elapsed = time.perf_counter() - started
            what = " (decode only: the rest runs on the model's device)" if resize == "device" else ""
            report.add(
                "preprocess", f"clip-worker resize={resize}{what}, {count} thread(s)", len(corpus) / elapsed
            )


def bench_large_jpegs(report: Report, params: Preprocessing, count: int) -> None:
    """Images/s on 1600x1200 JPEGs, one thread: full decode against libjpeg's draft mode."""
    from worker.samples import jpeg_corpus

    corpus = jpeg_corpus(count, 1600, 1200, 99)
    limits = ImageLimits(max_pixels=64_000_000)
    for draft in (False, True):
        ours = replace(params, resize="torch", jpeg_draft=draft)
        started = time.perf_counter()
        for data in corpus:
            decode_and_preprocess(data, limits, ours)
        case = "1600x1200 JPEG, resize=torch" + (", jpeg-draft" if draft else "") + ", 1 thread"
        report.add("preprocess", case, len(corpus) / (time.perf_counter() - started))
