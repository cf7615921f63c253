"""Decode + preprocessing throughput per thread count, ours against the reference processor."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial

import numpy as np
import torch

from worker.devtools.bench.report import Report
from worker.errors import StartupError
from worker.imaging.device_decode import DeviceJpegDecoder, decoded_only, load_jpeg_decoder
from worker.imaging.device_preprocess import preprocess_on_device
from worker.imaging.host import RESIZERS, ImageLimits, Preprocessing, decode_and_preprocess, load_rgb, prepare
from worker.inference.embedder import Embedder


def reference_pixels(processor: object, data: bytes) -> np.ndarray:
    """Reference preprocessing of one encoded image (NeMo Curator's per-image path)."""
    image = load_rgb(data, ImageLimits())
    pixels: np.ndarray = processor(images=image, return_tensors="np")["pixel_values"][0]  # type: ignore[operator]
    return pixels


def reference_processor(embedder: Embedder) -> object:
    """The parity reference: the embedder's family's own transformers processor (PIL backend) for its
    preprocessing."""
    return embedder.family.reference_processor(embedder.preprocessing)


def bench_preprocess(report: Report, corpus: list[bytes], embedder: Embedder, workers: list[int]) -> None:
    """Images/s of decode + preprocess over ``corpus`` with 1..N threads, and the reference on one thread."""
    limits = ImageLimits()
    params = embedder.preprocessing
    processor = reference_processor(embedder)
    started = time.perf_counter()
    for data in corpus:
        reference_pixels(processor, data)
    case = f"reference {type(processor).__name__}, 1 thread"
    report.add("preprocess", case, len(corpus) / (time.perf_counter() - started))
    variants = [(f"resize={resize}", replace(params, resize=resize)) for resize in RESIZERS]
    variants.append(("decode=device", replace(params, resize="device", decode="device")))
    notes = {
        "resize=device": " (decode only: the rest runs on the model's device)",
        "decode=device": " (header checks only: JPEGs decode on the model's device)",
    }
    for name, ours in variants:
        for count in workers:
            with ThreadPoolExecutor(max_workers=count) as pool:
                work = partial(prepare, limits=limits, params=ours)
                list(pool.map(work, corpus[:count]))
                started = time.perf_counter()
                list(pool.map(work, corpus))
                elapsed = time.perf_counter() - started
            case = f"clip-worker {name}{notes.get(name, '')}, {count} thread(s)"
            report.add("preprocess", case, len(corpus) / elapsed)


def bench_large_jpegs(report: Report, params: Preprocessing, count: int) -> None:
    """Images/s on 1600x1200 JPEGs, one thread: full decode against libjpeg's draft mode."""
    from worker.devtools.samples import jpeg_corpus

    corpus = jpeg_corpus(count, 1600, 1200, 99)
    limits = ImageLimits(max_pixels=64_000_000)
    for draft in (False, True):
        ours = replace(params, resize="torch", jpeg_draft=draft)
        started = time.perf_counter()
        for data in corpus:
            decode_and_preprocess(data, limits, ours)
        case = "1600x1200 JPEG, resize=torch" + (", jpeg-draft" if draft else "") + ", 1 thread"
        report.add("preprocess", case, len(corpus) / (time.perf_counter() - started))


def bench_device_preprocess(report: Report, embedder: Embedder, corpus: list[bytes], batch_size: int) -> None:
    """Images/s of the preprocessing that ``--resize device`` (and ``--decode device``) leave to the model's
    device, batch after batch: the host decodes for the first row, the device decodes too for the second."""
    corpus = corpus[: 4 * batch_size]  # decoded images are large (and decoded here on one thread): 4 batches
    limits = ImageLimits()
    host_decoded = [
        decode_and_preprocess(d, limits, replace(embedder.preprocessing, resize="device")) for d in corpus
    ]
    batches = range(0, len(corpus), batch_size)
    params, device = embedder.preprocessing, embedder.device
    with torch.inference_mode(), embedder.on_own_stream():
        preprocess_on_device(host_decoded[:batch_size], params, device)
        _synchronise(device)
        started = time.perf_counter()
        for start in batches:
            preprocess_on_device(host_decoded[start : start + batch_size], params, device)
        _synchronise(embedder.device)
        case = f"resize on {embedder.device} (--resize device), batch {batch_size}"
        report.add("preprocess", case, len(corpus) / (time.perf_counter() - started))
        if not device_decoding_available():
            return
        decoder = DeviceJpegDecoder(embedder.device, limits)
        params = replace(embedder.preprocessing, resize="device", decode="device")
        encoded = [prepare(d, limits, params) for d in corpus]
        started = time.perf_counter()
        for start in batches:
            decoded = decoder.materialise(encoded[start : start + batch_size])
            preprocess_on_device(decoded_only(decoded), embedder.preprocessing, embedder.device)
        _synchronise(embedder.device)
        case = f"decode + resize on {embedder.device} (--decode device), batch {batch_size}"
        report.add("preprocess", case, len(corpus) / (time.perf_counter() - started))


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_decoding_available() -> bool:
    """True when torchvision's ``decode_jpeg`` loads (``--decode device`` can run); says why not if not."""
    try:
        load_jpeg_decoder()
    except StartupError as exc:
        print(f"  (no --decode device rows: {exc})", flush=True)
        return False
    return True
