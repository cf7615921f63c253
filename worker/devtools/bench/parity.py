"""Parity of each preprocessing path with the reference: tensor difference and embedding cosine."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from worker.devtools.bench.preprocess import device_decoding_available, reference_pixels, reference_processor
from worker.devtools.bench.report import Report
from worker.devtools.samples import jpeg_corpus, sample_images
from worker.imaging.device_decode import DeviceJpegDecoder, decoded_only
from worker.imaging.device_preprocess import preprocess_on_device
from worker.imaging.host import RESIZERS, ImageLimits, Preprocessing, decode_and_preprocess, prepare
from worker.inference.embedder import Embedder


def bench_parity(report: Report, embedder: Embedder, count: int) -> dict[str, dict[str, float]]:
    """For every resize path: max |difference| of the normalised tensor and min cosine of the embeddings.

    ``device`` and ``device+decode`` run on the embedder's device: their figures on a CPU say nothing of
    the GPU kernels (nor of nvJPEG, for which torchvision's CPU decoder stands in there).
    """
    # Large JPEGs too, so the draft-mode variant actually decodes at reduced scale.
    third = count // 3
    images = (
        [s.data for s in sample_images(third, seed=9)]
        + jpeg_corpus(third, 640, 480, 77)
        + jpeg_corpus(count - 2 * third, 1600, 1200, 78)
    )
    processor = reference_processor(embedder)
    reference = np.stack([reference_pixels(processor, data) for data in images])
    reference_vectors = _embed(embedder, reference)
    results: dict[str, dict[str, float]] = {}
    variants = [(mode, replace(embedder.preprocessing, resize=mode)) for mode in RESIZERS]
    variants.append(("torch+jpeg-draft", replace(embedder.preprocessing, resize="torch", jpeg_draft=True)))
    if device_decoding_available():
        variants.append(("device+decode", replace(embedder.preprocessing, resize="device", decode="device")))
    for mode, params in variants:
        ours = _pixels(images, params, embedder.device)
        vectors = _embed(embedder, ours)
        cosine = float(np.min(np.sum(vectors * reference_vectors, axis=1)))
        difference = float(np.abs(ours - reference).max())
        results[mode] = {"max_abs_diff": difference, "min_cosine": cosine}
        report.parity[mode] = {
            **results[mode],
            "images": len(images),
            "model": embedder.label,
            "device": str(embedder.device),
        }
        report.checkpoint()
        print(
            f"  parity      {mode:<16} max|diff| {difference:.2e}  min cosine {cosine:.6f}  "
            f"({len(images)} images, {embedder.label})",
            flush=True,
        )
    return results


def _pixels(images: list[bytes], params: Preprocessing, device: torch.device) -> np.ndarray:
    """The normalised batch one preprocessing path makes of ``images``, on the host."""
    limits = ImageLimits()
    if params.decode == "device":
        decoded = DeviceJpegDecoder(device, limits).materialise([prepare(d, limits, params) for d in images])
        return preprocess_on_device(decoded_only(decoded), params, device).cpu().numpy()
    pixels = [decode_and_preprocess(data, limits, params) for data in images]
    if params.resize == "device":
        return preprocess_on_device(pixels, params, device).cpu().numpy()
    return np.stack(pixels)


def _embed(embedder: Embedder, pixels: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([embedder.embed(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])
