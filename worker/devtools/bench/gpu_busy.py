"""GPU busy, measured: a sampler process writes utilisation every 500 ms to a CSV file, and the bench averages
the samples that fall in each end-to-end row's steady state.

``python -m worker.devtools.bench.gpu_busy --output FILE`` samples until it is terminated. Its source is NVML
(nvidia-ml-py), else ``nvidia-smi``; on a machine with neither (a CPU rehearsal) it samples the host CPU's
busy share from ``/proc/stat`` instead, so the whole path runs, and every line names its source.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

HEADER = ("epoch_s", "busy_percent", "memory_used_mib", "source")
Sampler = Callable[[], tuple[float, float]]  # () -> (busy %, memory used MiB)


def _nvml_sampler() -> Sampler | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:
        return None

    def sample() -> tuple[float, float]:
        rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return float(rates.gpu), memory.used / 2**20

    return sample


def _nvidia_smi_sampler() -> Sampler | None:
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None

    def sample() -> tuple[float, float]:
        query = ["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "--id=0"]
        out = subprocess.run([binary, *query], capture_output=True, text=True, timeout=5, check=True)
        busy, memory = out.stdout.strip().splitlines()[0].split(",")
        return float(busy), float(memory)

    return sample


def _cpu_sampler() -> Sampler:
    last = _cpu_times()

    def sample() -> tuple[float, float]:
        nonlocal last
        now = _cpu_times()
        busy, total = now[0] - last[0], now[1] - last[1]
        last = now
        return (100.0 * busy / total if total else 0.0), 0.0

    return sample


def _cpu_times() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def pick_sampler() -> tuple[str, Sampler]:
    """NVML, else nvidia-smi, else the host CPU (named as such)."""
    for name, make in (("nvml", _nvml_sampler), ("nvidia-smi", _nvidia_smi_sampler)):
        sampler = make()
        if sampler is not None:
            return name, sampler
    return "cpu-stand-in", _cpu_sampler()


def sample_forever(output: Path, interval_s: float) -> None:
    """Append one sample per ``interval_s`` to ``output`` until SIGTERM or SIGINT."""
    source, sampler = pick_sampler()
    running = True

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        next_at = time.monotonic()
        while running:
            try:
                busy, memory = sampler()
                writer.writerow((f"{time.time():.3f}", f"{busy:.1f}", f"{memory:.0f}", source))
            except Exception as exc:  # a failed query is a gap in the file, not the end of sampling
                print(f"gpu_busy: {source} sample failed: {exc}", file=sys.stderr, flush=True)
            handle.flush()
            next_at += interval_s
            time.sleep(max(0.0, next_at - time.monotonic()))


def mean_busy(path: Path, start: float, end: float) -> dict[str, Any]:
    """Mean busy % of the samples taken between the epoch times ``start`` and ``end``.

    Returns ``{"gpu_busy": "87%", "gpu_busy_samples": 9, "gpu_busy_source": "nvml"}``, with busy ``n/a``
    when fewer than two samples fall in the window (a row too short to say).
    """
    samples: list[float] = []
    source = "none"
    if path.is_file():
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                try:
                    when, busy = float(row["epoch_s"]), float(row["busy_percent"])
                except (KeyError, TypeError, ValueError):
                    continue  # a line cut short when the sampler was killed
                if start <= when <= end:
                    samples.append(busy)
                    source = row.get("source") or source
    busy_text = f"{sum(samples) / len(samples):.0f}%" if len(samples) >= 2 else "n/a"
    return {"gpu_busy": busy_text, "gpu_busy_samples": len(samples), "gpu_busy_source": source}


def main(argv: list[str] | None = None) -> int:
    """Sample to ``--output`` every ``--interval-s`` seconds until terminated."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--interval-s", type=float, default=0.5)
    args = parser.parse_args(argv)
    sample_forever(args.output, args.interval_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
