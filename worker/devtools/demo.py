"""``clip-worker demo``: a local broker, sample images, the worker, and a summary; then everything stops."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from worker.config import DEFAULT_MODEL, load_settings
from worker.devtools.brokers import TansuBroker
from worker.devtools.samples import broken_samples, sample_images
from worker.errors import ModelLoadError
from worker.inference.embedder import Embedder, ModelSpec, load_embedder
from worker.kafka_io import IgnoreRebalances, ensure_topics, open_producer, open_reader
from worker.loop.service import run_worker
from worker.messages import REASON_HEADER, decode_embedding, encode_request

_DEMO_TIMEOUT_S = 900.0
_POLL_RECORDS = 500


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers on its HTTPS port (checked once, quickly, before a download)."""
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection(
            (endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout_s
        ):
            return True
    except OSError:
        return False


def load_demo_model(device: str, dtype: str) -> Embedder:
    """Real ViT-L/14 weights when cached or downloadable (cached after the first run), random ones if not."""
    spec = ModelSpec(model=DEFAULT_MODEL, device=device, dtype=dtype)
    try:
        return load_embedder(replace(spec, local_files_only=True))
    except ModelLoadError:
        pass
    if hub_reachable():
        try:
            return load_embedder(spec)
        except ModelLoadError as exc:
            print(f"could not download the weights ({exc}): continuing with RANDOM weights")
    else:
        print(f"no network and no cached weights for {DEFAULT_MODEL}: continuing with RANDOM weights")
    return load_embedder(replace(spec, random_weights=True))


def run_demo(
    count: int = 48,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto",
    kafka_client: str = "kafka-python",
) -> int:
    """Run the whole demo on the Kafka client ``kafka_client`` (``--kafka-client``); returns the exit code."""
    print("starting a local Kafka-compatible broker (Tansu, in memory) ...")
    with TansuBroker() as broker:
        settings = load_settings(
            {
                "bootstrap_servers": broker.bootstrap_servers,
                "group_id": "clip-worker-demo",
                "batch_size": batch_size,
                "metrics_port": 0,
                # Tansu completes a join after about half the session timeout: keep it short.
                "session_timeout_ms": 6_000,
                "device": device,
                "dtype": dtype,
                "log_level": "warning",
                "kafka_client": kafka_client,
            },
            environ={},
        )
        ensure_topics(settings, {settings.input_topic: 3, settings.output_topic: 3, settings.dlq_topic: 1})
        good = sample_images(count)
        bad = broken_samples()
        producer = open_producer(settings)
        for sample in good + bad:
            value = encode_request(sample.name, sample.data, {"description": sample.description})
            producer.send(settings.input_topic, sample.name.encode(), value, [])
        producer.flush()
        producer.close(timeout=10.0)
        formats = sorted({sample.name.split(".", 1)[1] for sample in good})
        print(f"published {len(good)} sample images ({', '.join(formats)}) and {len(bad)} broken ones")

        print(f"loading {DEFAULT_MODEL} ...")
        embedder = load_demo_model(device, dtype)
        print(f"model {embedder.label} on {embedder.device} ({str(embedder.dtype).removeprefix('torch.')})")
        stop = threading.Event()
        exit_codes: list[int] = []
        worker = threading.Thread(
            target=lambda: exit_codes.append(run_worker(settings, stop, embedder=embedder)), name="worker"
        )
        started = time.monotonic()
        worker.start()
        outputs, dead = _collect(settings, expected=len(good) + len(bad), worker=worker)
        elapsed = time.monotonic() - started
        stop.set()
        worker.join(timeout=settings.shutdown_grace_s + 10)
    _print_summary(embedder, outputs, dead, elapsed)
    missing = len(good) + len(bad) - len(outputs) - sum(dead.values())
    return 0 if missing == 0 and exit_codes == [0] else 1


def _collect(
    settings: Any, expected: int, worker: threading.Thread
) -> tuple[list[dict[str, Any]], Counter[str]]:
    consumer = open_reader(settings)
    consumer.subscribe([settings.output_topic, settings.dlq_topic], IgnoreRebalances())
    outputs: dict[str, dict[str, Any]] = {}
    dead: dict[bytes | None, str] = {}
    deadline = time.monotonic() + _DEMO_TIMEOUT_S
    shown = (-1, -1)
    try:
        while len(outputs) + len(dead) < expected and time.monotonic() < deadline and worker.is_alive():
            for messages in consumer.poll(500, _POLL_RECORDS).values():
                for message in messages:
                    if message.topic == settings.output_topic:
                        record = decode_embedding(message.value or b"")
                        outputs[record["id"]] = record
                    else:
                        reason = (dict(message.headers or []).get(REASON_HEADER) or b"?").decode()
                        dead[message.key] = reason
            if (len(outputs), len(dead)) != shown:
                shown = (len(outputs), len(dead))
                _progress(f"  embedded {shown[0]}, dead-lettered {shown[1]} of {expected}")
    finally:
        consumer.close(timeout_ms=5_000)
        if sys.stdout.isatty():
            print()
    return list(outputs.values()), Counter(dead.values())


def _progress(line: str) -> None:
    if sys.stdout.isatty():
        print(f"\r{line}", end="", flush=True)
    else:
        print(line, flush=True)


def _print_summary(
    embedder: Embedder, outputs: list[dict[str, Any]], dead: Counter[str], elapsed: float
) -> None:
    warning = "   (RANDOM WEIGHTS: vectors are meaningless)" if embedder.is_random else ""
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(dead.items()))
    print("\n== clip-worker demo summary ==")
    print(f"model            {embedder.label}{warning}")
    print(f"device / dtype   {embedder.device} / {str(embedder.dtype).removeprefix('torch.')}")
    print(f"embedded         {len(outputs)} image(s)")
    print(f"dead-lettered    {sum(dead.values())} ({reasons or 'none'})")
    print(
        f"throughput       {len(outputs) / elapsed:.2f} images/s over {elapsed:.1f}s (Kafka in to Kafka out)"
    )
    if outputs:
        first = sorted(outputs, key=lambda r: r["id"])[0]
        vector = first["embedding"]
        head = ", ".join(f"{x:+.4f}" for x in vector[:6])
        print(f"dim              {first['dim']}")
        print(f"sample           {first['id']}: [{head}, ...] norm {np.linalg.norm(vector):.4f}")
