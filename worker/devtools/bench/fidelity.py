"""Fidelity of the dtype on the device: bfloat16 embeddings against float32 ones of the same weights."""

from __future__ import annotations

import copy

import numpy as np
import torch

from worker.devtools.bench.preprocess import reference_pixels, reference_processor
from worker.devtools.bench.report import Report
from worker.devtools.samples import jpeg_corpus, sample_images
from worker.inference.embedder import Embedder


def with_dtype(embedder: Embedder, dtype: str | None) -> Embedder:
    """The embedder itself if it already runs in ``dtype`` (None: its own), else a copy of it in ``dtype``."""
    wanted = getattr(torch, dtype) if dtype else embedder.dtype
    if wanted == embedder.dtype:
        return embedder
    model = copy.deepcopy(embedder.model).to(wanted)
    return Embedder(model, embedder.label, embedder.revision, embedder.preprocessing, embedder.device, wanted)


def bench_dtype_fidelity(report: Report, embedder: Embedder, count: int, batch: int = 16) -> float:
    """Min cosine between bfloat16 and float32 embeddings of ``count`` reference-preprocessed images, on the
    embedder's device; recorded in the report's ``fidelity``."""
    half = count // 2
    images = [s.data for s in sample_images(half, seed=31)] + jpeg_corpus(count - half, 640, 480, 32)
    processor = reference_processor(embedder)
    pixels = np.stack([reference_pixels(processor, data) for data in images])
    vectors = {}
    for dtype in ("float32", "bfloat16"):
        model = with_dtype(embedder, dtype)
        vectors[dtype] = np.concatenate(
            [model.embed(pixels[i : i + batch]) for i in range(0, len(pixels), batch)]
        )
    cosines = np.sum(vectors["float32"] * vectors["bfloat16"], axis=1)
    worst = float(np.min(cosines))
    report.fidelity["bfloat16 vs float32"] = {
        "min_cosine": round(worst, 6),
        "mean_cosine": round(float(np.mean(cosines)), 6),
        "images": len(images),
        "device": str(embedder.device),
        "model": embedder.label,
    }
    report.checkpoint()
    print(f"  fidelity    bfloat16 vs float32: min cosine {worst:.6f} over {len(images)} images", flush=True)
    return worst
