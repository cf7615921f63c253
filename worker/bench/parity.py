"""Parity of each preprocessing path with the reference: tensor difference and embedding cosine."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from worker.bench.preprocess import reference_pixels, reference_processor
from worker.bench.report import Report
from worker.device_resize import preprocess_on_device
from worker.embedder import Embedder
from worker.images import RESIZERS, ImageLimits, decode_and_preprocess
from worker.samples import jpeg_corpus, sample_images


def bench_parity(report: Report, embedder: Embedder, count: int) -> dict[str, dict[str, float]]:
    """For every resize path: max |difference| of the normalised tensor and min cosine of the embeddings.

    ``device`` runs on the embedder's device: its figures on a CPU say nothing of the GPU kernels.
    """
    # Large JPEGs too, so the draft-mode variant actually decodes at reduced scale.
    third = count // 3
    images = (
        [s.data for s in sample_images(third, seed=9)]
        + jpeg_corpus(third, 640, 480, 77)
        + jpeg_corpus(count - 2 * third, 1600, 1200, 78)
    )
    processor = reference_processor(embedder.preprocessing)
    reference = np.stack([reference_pixels(processor, data) for data in images])
    reference_vectors = _embed(embedder, reference)
    results: dict[str, dict[str, float]] = {}
    variants = [(mode, replace(embedder.preprocessing, resize=mode)) for mode in RESIZERS]
    variants.append(("torch+jpeg-draft", replace(embedder.preprocessing, resize="torch", jpeg_draft=True)))
    for mode, params in variants:
        decoded = [decode_and_preprocess(data, ImageLimits(), params) for data in images]
        if mode == "device":
            ours = preprocess_on_device(decoded, params, embedder.device).cpu().numpy()
        else:
            ours = np.stack(decoded)
        vectors = _embed(embedder, ours)
        cosine = float(np.min(np.sum(vectors * reference_vectors, axis=1)))
        difference = float(np.abs(ours - reference).max())
        results[mode] = {"max_abs_diff": difference, "min_cosine": cosine}
        report.parity[mode] = {**results[mode], "images": len(images), "model": embedder.label}
        print(
            f"  parity      {mode:<16} max|diff| {difference:.2e}  min cosine {cosine:.6f}  "
            f"({len(images)} images, {embedder.label})",
            flush=True,
        )
    return results


def _embed(embedder: Embedder, pixels: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([embedder.embed(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])
