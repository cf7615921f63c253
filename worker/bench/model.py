"""Model-only throughput: synthetic pixels, per batch size and dtype."""

from __future__ import annotations

import time

import numpy as np
import torch

from worker.bench.report import Report
from worker.embedder import Embedder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(report: Report, embedder: Embedder, batch_sizes: list[int], seconds: float) -> None:
    """Images/s of ``embedder.embed`` on random normalised pixels, after one warm-up batch."""
    size = embedder.preprocessing.crop
    for batch_size in batch_sizes:
        pixels = np.random.default_rng(0).standard_normal((batch_size, 3, size, size), dtype=np.float32)
        embedder.embed(pixels)
        _sync(embedder.device)
        done = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            embedder.embed(pixels)
            done += batch_size
        _sync(embedder.device)
        elapsed = time.perf_counter() - started
        report.add(
            "model",
            f"batch {batch_size}",
            done / elapsed,
            dtype=str(embedder.dtype).removeprefix("torch."),
            device=str(embedder.device),
        )
