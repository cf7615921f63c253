"""Shared fixtures: a tiny CLIP checkpoint and a real Kafka broker."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.tiny_clip import build_tiny_clip
from worker.embedder import Embedder, ModelSpec, load_embedder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP checkpoint saved like a hub checkpoint."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_embedder(tiny_clip_dir: Path) -> Embedder:
    """The tiny checkpoint loaded through the real loading code, on the CPU."""
    return load_embedder(ModelSpec(model=str(tiny_clip_dir), device="cpu"))


def _docker_engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return (
            subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Kafka broker: ``$KAFKA_BOOTSTRAP_SERVERS``, else testcontainers with a Docker engine, else a
    single KRaft node from the Apache Kafka jars."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    if _docker_engine_available():
        from testcontainers.kafka import KafkaContainer

        from tests.support.kafka_broker import kafka_version

        with KafkaContainer(f"apache/kafka:{kafka_version()}").with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    from tests.support.kafka_broker import ApacheKafka

    broker = ApacheKafka(tmp_path_factory.mktemp("kafka")).start()
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()
