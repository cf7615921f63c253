"""``clip-worker fleet``: N worker processes in one consumer group on one host, each pinned to a device.

One process per GPU, or several per GPU (like NeMo Curator's ``num_gpus_per_worker=0.25``), or N CPU
processes. Each child is ``clip-worker run`` with the same flags, its own metrics port and client id, and
``CUDA_VISIBLE_DEVICES`` naming its GPU. SIGTERM/SIGINT are forwarded so every child drains; if one child
fails the others are stopped and the fleet exits non-zero, so the orchestrator restarts the whole unit.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from worker.errors import StartupError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    """One child process: its index, its GPU (None on CPU) and its metrics port (0 = disabled)."""

    index: int
    gpu: int | None
    metrics_port: int


def plan_slots(gpus: list[int], per_gpu: int, cpu_processes: int, metrics_port_base: int) -> list[Slot]:
    """The processes to start: ``per_gpu`` per listed GPU, or ``cpu_processes`` when no GPU is listed."""
    if per_gpu < 1 or cpu_processes < 1:
        raise StartupError("--per-gpu and --cpu-processes must be at least 1")
    devices: list[int | None] = [g for g in gpus for _ in range(per_gpu)] if gpus else [None] * cpu_processes
    return [
        Slot(index, gpu, metrics_port_base + index if metrics_port_base else 0)
        for index, gpu in enumerate(devices)
    ]


def parse_gpus(spec: str) -> list[int]:
    """``all`` (every visible GPU), ``none``, or a comma-separated list of indices."""
    if spec == "none":
        return []
    if spec == "all":
        import torch

        return list(range(torch.cuda.device_count()))
    try:
        return [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise StartupError(f"--gpus {spec!r}: use all, none, or indices such as 0,1") from None


def child_command(slot: Slot, run_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Command line and environment of one child."""
    env = dict(os.environ)
    args = [sys.executable, "-m", "worker.cli", "run", *run_args]
    args += ["--metrics-port", str(slot.metrics_port), "--client-id", f"clip-worker-{slot.index}"]
    if slot.gpu is None:
        args += ["--device", "cpu"]
    else:
        env["CUDA_VISIBLE_DEVICES"] = str(slot.gpu)
        args += ["--device", "cuda:0"]
    instance = env.get("CLIP_WORKER_GROUP_INSTANCE_ID")
    if instance:
        env["CLIP_WORKER_GROUP_INSTANCE_ID"] = f"{instance}-{slot.index}"
    return args, env


def run_fleet(slots: list[Slot], run_args: list[str]) -> int:
    """Start every slot, forward stop signals, and return the worst exit code."""
    children: list[tuple[Slot, subprocess.Popen[bytes]]] = []
    for slot in slots:
        command, env = child_command(slot, run_args)
        children.append((slot, subprocess.Popen(command, env=env)))
        where = f"GPU {slot.gpu}" if slot.gpu is not None else "CPU"
        log.info(
            "fleet: started worker %d on %s (pid %d, metrics port %d)",
            slot.index,
            where,
            children[-1][1].pid,
            slot.metrics_port,
        )

    def forward(signum: int, _frame: FrameType | None) -> None:
        for _slot, process in children:
            if process.poll() is None:
                process.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    while any(process.poll() is None for _slot, process in children):
        for slot, process in children:
            code = process.poll()
            if code not in (None, 0) and worst == 0:
                worst = code
                log.error("fleet: worker %d exited with %d; stopping the others", slot.index, code)
                forward(signal.SIGTERM, None)
        time.sleep(0.2)
    codes = [process.returncode for _slot, process in children]
    return worst or max(codes, default=0)
