"""Model-only throughput: the forward pass alone on inputs already on the device, per batch size and dtype,
and apart from it the cost of copying a batch from pinned host memory to the device.

On a GPU both are timed with CUDA events on the embedder's stream, so the figure is the device's time and
not the host's launch loop; on a CPU with the host clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from worker.devtools.bench.report import Report
from worker.inference.embedder import Embedder

_WARMUP_CALLS = 2


def bench_model(
    report: Report, embedder: Embedder, batch_sizes: list[int], seconds: float, **detail: Any
) -> None:
    """Images/s of :meth:`Embedder.features` on random pixels already on the device, in its dtype."""
    size = embedder.preprocessing.crop
    generator = torch.Generator().manual_seed(0)
    for batch_size in batch_sizes:
        pixels = torch.randn((batch_size, 3, size, size), generator=generator)
        with torch.inference_mode(), embedder.on_own_stream():
            on_device = pixels.to(embedder.device).to(embedder.dtype)

            def forward(batch: torch.Tensor = on_device) -> torch.Tensor:
                return embedder.features(batch)

            calls, elapsed = time_calls(forward, embedder.device, seconds)
        report.add(
            "model",
            f"batch {batch_size}, forward pass",
            calls * batch_size / elapsed,
            dtype=str(embedder.dtype).removeprefix("torch."),
            device=str(embedder.device),
            ms_per_batch=round(1000 * elapsed / calls, 2),
            **detail,
        )


def bench_copy(report: Report, embedder: Embedder, batch_sizes: list[int], seconds: float) -> None:
    """Images/s (and GB/s) of copying a float32 batch from pinned host memory to the device, as the worker's
    ``launch`` does; on a CPU a plain memory copy stands in."""
    size = embedder.preprocessing.crop
    on_gpu = embedder.device.type == "cuda"
    for batch_size in batch_sizes:
        host = torch.zeros((batch_size, 3, size, size), dtype=torch.float32, pin_memory=on_gpu)

        def copy(host: torch.Tensor = host) -> torch.Tensor:
            return host.to(embedder.device, non_blocking=True) if on_gpu else host.clone()

        with torch.inference_mode(), embedder.on_own_stream():
            calls, elapsed = time_calls(copy, embedder.device, seconds)
        gigabytes = calls * host.numel() * host.element_size() / 1e9
        report.add(
            "copy",
            f"batch {batch_size}, host to {embedder.device.type}" + (" (pinned)" if on_gpu else ""),
            calls * batch_size / elapsed,
            gb_per_s=round(gigabytes / elapsed, 1),
            ms_per_batch=round(1000 * elapsed / calls, 3),
        )


def time_calls(call: Callable[[], object], device: torch.device, seconds: float) -> tuple[int, float]:
    """Run ``call`` about ``seconds`` long after a warm-up; returns (calls, seconds they took).

    The number of calls comes from timing one, so the host never queues far more work than it measures.
    """
    for _ in range(_WARMUP_CALLS):
        call()
    one = _timed(call, device, 1)
    calls = max(3, math.ceil(seconds / max(one, 1e-6)))
    return calls, _timed(call, device, calls)


def _timed(call: Callable[[], object], device: torch.device, calls: int) -> float:
    if device.type != "cuda":
        started = time.perf_counter()
        for _ in range(calls):
            call()
        return time.perf_counter() - started
    # Device time between two events on the current stream: what the GPU spent, not the host's loop.
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    torch.cuda.current_stream(device).synchronize()
    start.record()
    for _ in range(calls):
        call()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / 1000
