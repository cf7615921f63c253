"""Shared fixtures: a tiny CLIP checkpoint and a real Kafka broker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.tiny_clip import build_tiny_clip
from worker.inference.embedder import Embedder, ModelSpec, load_embedder

if TYPE_CHECKING:  # testcontainers is imported only when an engine answers
    from tests.support.kafka_container import KafkaBrokerContainer


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP checkpoint saved like a hub checkpoint."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_embedder(tiny_clip_dir: Path) -> Embedder:
    """The tiny checkpoint loaded through the real loading code, on the CPU."""
    return load_embedder(ModelSpec(model=str(tiny_clip_dir), device="cpu"))


@pytest.fixture(scope="session")
def tiny_clip_768_embedder(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    """A tiny random CLIP whose embeddings are 768-d like ViT-L/14's (what the score heads read), loaded
    through the real loading code on the CPU."""
    directory = build_tiny_clip(tmp_path_factory.mktemp("tiny-clip-768"), projection_dim=768)
    return load_embedder(ModelSpec(model=str(directory), device="cpu"))


@pytest.fixture(scope="session")
def jar_kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A single KRaft node from the Apache Kafka jars (Maven Central) on loopback, engine or not."""
    from tests.support.kafka_broker import ApacheKafka

    broker = ApacheKafka(tmp_path_factory.mktemp("kafka")).start()
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_container() -> Iterator[KafkaBrokerContainer]:
    """Kafka in a container (testcontainers), on a network where other containers reach it as kafka:19092.

    Fails in CI and skips elsewhere when no container engine answers."""
    from tests.support.engine import ensure_image, kafka_image, require_engine

    require_engine()
    from testcontainers.core.network import Network

    from tests.support.kafka_container import KafkaBrokerContainer

    image = ensure_image(kafka_image(), "kafka")
    with Network() as network, KafkaBrokerContainer(image, network) as container:
        yield container


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> str:
    """A real Kafka broker: ``$KAFKA_BOOTSTRAP_SERVERS``; else Kafka in a container when an engine answers
    (always in CI); else a single KRaft node from the Apache Kafka jars on loopback."""
    from tests.support.engine import engine_answers, engine_required

    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        return external
    if engine_answers() or engine_required():
        container: KafkaBrokerContainer = request.getfixturevalue("kafka_container")
        return container.bootstrap_servers
    bootstrap: str = request.getfixturevalue("jar_kafka_bootstrap")
    return bootstrap
