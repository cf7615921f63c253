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


def bench_model(
    report: Report, embedder: Embedder, batch_sizes: list[int], seconds: float, compile_mode: str = "off"
) -> None:
    """Images/s of ``embedder.embed`` on random normalised pixels, after one warm-up batch.

    With ``compile_mode`` each batch size is compiled first (a fresh view of the same weights).
    """
    size = embedder.preprocessing.crop
    for batch_size in batch_sizes:
        pixels = np.random.default_rng(0).standard_normal((batch_size, 3, size, size), dtype=np.float32)
        extra: dict[str, str] = {}
        if compile_mode != "off":
            embedder = embedder.view()
            extra = {
                "compile": compile_mode,
                "compile_s": f"{embedder.compile(compile_mode, batch_size):.0f}",
            }
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
            **extra,
        )
