"""GPU metrics, read at scrape time: NVML utilisation and memory, torch allocator bytes.

Absent on CPU-only hosts: the collector then yields no samples at all rather than zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


def _nvml() -> Any | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # not installed, no driver, or no GPU
        return None


class GpuCollector(Collector):
    """Per-device gauges: utilisation ratio, memory used/total bytes, torch allocated/reserved bytes."""

    def __init__(self, devices: list[int] | None = None) -> None:
        self._available = torch.cuda.is_available()
        self._devices = devices if devices is not None else list(range(torch.cuda.device_count()))
        self._nvml = _nvml() if self._available else None

    def utilization(self) -> float | None:
        """Mean utilisation ratio over the devices, for the progress log line; None without NVML."""
        if self._nvml is None or not self._devices:
            return None
        ratios = [self._nvml_sample(index)[0] for index in self._devices]
        known = [r for r in ratios if r is not None]
        return sum(known) / len(known) if known else None

    def _nvml_sample(self, index: int) -> tuple[float | None, int | None, int | None]:
        if self._nvml is None:
            return None, None, None
        try:
            handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            return rates.gpu / 100.0, int(memory.used), int(memory.total)
        except Exception as exc:
            log.debug("NVML query failed for GPU %d: %s", index, exc)
            return None, None, None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self._available or not self._devices:
            return
        utilisation = GaugeMetricFamily(
            "clip_worker_gpu_utilization_ratio",
            "GPU busy ratio over NVML's last sample period",
            labels=["gpu"],
        )
        used = GaugeMetricFamily(
            "clip_worker_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"]
        )
        total = GaugeMetricFamily(
            "clip_worker_gpu_memory_total_bytes", "GPU memory size (NVML)", labels=["gpu"]
        )
        allocated = GaugeMetricFamily(
            "clip_worker_torch_allocated_bytes", "Bytes held by torch tensors", labels=["gpu"]
        )
        reserved = GaugeMetricFamily(
            "clip_worker_torch_reserved_bytes", "Bytes reserved by torch's caching allocator", labels=["gpu"]
        )
        for index in self._devices:
            label = [str(index)]
            ratio, used_bytes, total_bytes = self._nvml_sample(index)
            if ratio is not None:
                utilisation.add_metric(label, ratio)
            if used_bytes is not None and total_bytes is not None:
                used.add_metric(label, used_bytes)
                total.add_metric(label, total_bytes)
            allocated.add_metric(label, torch.cuda.memory_allocated(index))
            reserved.add_metric(label, torch.cuda.memory_reserved(index))
        yield from (utilisation, used, total, allocated, reserved)
