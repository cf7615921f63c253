"""``--sections serve``: requests/s and latency of ``clip-worker serve``, the real server process, under
closed-loop load: N clients each send one request, wait for its answer, and send the next.

Single texts with batching on (``--serve-batch-size``, ``--serve-batch-timeout-ms``) and off (batches of
one), then single images by base64 with batching on. The p50/p99 latencies are what a user sizes the batch
timeout with: on a quiet server a request waits up to the timeout for company.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from worker.devtools.bench.report import Report
from worker.devtools.samples import jpeg_corpus
from worker.devtools.tiny_model import build_tiny_clip, write_vit_l14_shape

_WARM_UP_REQUESTS_PER_CLIENT = 2
# --model value: ViT-L/14's architecture with random weights and a small stand-in vocabulary, offline.
VIT_L14_SHAPE = "vit-l14-shape"


def bench_serve(report: Report, args: argparse.Namespace, scratch: Path) -> None:
    """The rows of the serve section; the ratio of batching on to off at the most clients."""
    model = _model_flags(args, scratch)
    text_clients = [int(n) for n in args.serve_clients.split(",")]
    image_clients = [int(n) for n in args.serve_image_clients.split(",") if n]
    image = base64.b64encode(jpeg_corpus(1, 500, 375)[0]).decode()
    best: dict[str, float] = {}
    for mode, batch_size in (("on", args.serve_batch_size), ("off", 1)):
        flags = [
            *model,
            "--batch-size",
            str(batch_size),
            "--batch-timeout-ms",
            str(args.serve_batch_timeout_ms),
        ]
        with _server(flags, args.row_timeout) as url:
            for clients in text_clients:
                case = f"texts, batching {mode}, {clients} clients"
                best[case] = _row(report, url, case, clients, args.seconds, {"input": "a photo of a dog"})
            if mode == "on":
                for clients in image_clients:
                    case = f"images by base64, batching on, {clients} clients"
                    _row(report, url, case, clients, args.seconds, {"input": image, "modality": "image"})
    most = max(text_clients)
    off = best.get(f"texts, batching off, {most} clients", 0.0)
    if off:
        report.ratios[f"serve_batching_on_over_off_{most}_clients"] = round(
            best[f"texts, batching on, {most} clients"] / off, 2
        )


def _model_flags(args: argparse.Namespace, scratch: Path) -> list[str]:
    device = ["--device", args.device, "--dtype", args.dtype]
    if args.model == VIT_L14_SHAPE:  # ViT-L/14's towers, random, without the hub's tokenizer files
        return ["--model", str(write_vit_l14_shape(scratch / "vit-l14")), "--random-weights", *device]
    if args.model == "tiny":
        return [
            "--model",
            str(build_tiny_clip(scratch / "serve-tiny", image_size=224, patch_size=32)),
            *device,
        ]
    return ["--model", args.model, *(["--random-weights"] if args.random_weights else []), *device]


@contextlib.contextmanager
def _server(flags: list[str], timeout_s: float) -> Iterator[str]:
    """``clip-worker serve`` on a free loopback port until the block ends (SIGTERM, then its exit)."""
    import httpx

    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "worker.cli",
        "serve",
        "--serve-host",
        "127.0.0.1",
        "--serve-port",
        str(port),
    ]
    command += [*flags, "--serve-max-queue", "4096", "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while process.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            else:
                log.seek(0)
                raise RuntimeError(
                    f"serve did not become ready: {log.read().decode(errors='replace')[-2000:]}"
                )
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _row(report: Report, url: str, case: str, clients: int, seconds: float, body: dict[str, Any]) -> float:
    latencies, errors, elapsed = asyncio.run(_load(url, clients, seconds, body))
    if not latencies:
        report.add("serve", case, 0.0, failed=f"no answer in {seconds:g}s ({errors} errors)")
        return 0.0
    latencies.sort()
    rate = len(latencies) / elapsed
    report.add(
        "serve",
        case,
        rate,
        unit="requests/s",
        p50_ms=round(_percentile(latencies, 0.50) * 1000, 1),
        p99_ms=round(_percentile(latencies, 0.99) * 1000, 1),
        requests=len(latencies),
        errors=errors,
    )
    return rate


async def _load(
    url: str, clients: int, seconds: float, body: dict[str, Any]
) -> tuple[list[float], int, float]:
    """``clients`` closed loops for ``seconds`` after a warm-up; the latencies of the answered requests that
    started in the window, the errors, and the window's length."""
    import httpx

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:

        async def one() -> float | None:
            started = time.perf_counter()
            answer = await client.post("/v1/embeddings", json=body)
            return time.perf_counter() - started if answer.status_code == 200 else None

        await asyncio.gather(*(one() for _ in range(clients * _WARM_UP_REQUESTS_PER_CLIENT)))
        window_start = time.perf_counter()
        window_end = window_start + seconds

        async def loop() -> None:
            nonlocal errors
            while time.perf_counter() < window_end:
                latency = await one()
                if latency is None:
                    errors += 1
                else:
                    latencies.append(latency)

        await asyncio.gather(*(loop() for _ in range(clients)))
        elapsed = time.perf_counter() - window_start
    return latencies, errors, elapsed


def _percentile(ordered: list[float], share: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]
