"""Which Kafka client runs: the one place that reads ``--kafka-client``.

The runtime and the tooling open their clients through the functions here; each hands over to the chosen
library's factories (:mod:`worker.kafka_io.factories` for kafka-python, :mod:`worker.kafka_io.librdkafka`
for librdkafka), and gets the layer's Protocols back either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from worker.config import Settings
from worker.errors import StartupError
from worker.kafka_io import factories
from worker.kafka_io.types import Consumer, Producer


@dataclass(frozen=True)
class ClientLibrary:
    """The factories of one Kafka client library."""

    open_consumer: Callable[[Settings, bool], Consumer]
    open_reader: Callable[[Settings, bool], Consumer]
    open_producer: Callable[[Settings, str | None, int | None], Producer]
    topic_message_limits: Callable[[Settings, list[str]], dict[str, int]]
    ensure_topics: Callable[[Settings, dict[str, int], int | None], None]

    @classmethod
    def of(cls, module: ModuleType) -> ClientLibrary:
        """The factories a module defines under these names."""
        return cls(
            module.open_consumer,
            module.open_reader,
            module.open_producer,
            module.topic_message_limits,
            module.ensure_topics,
        )


def library(settings: Settings) -> ClientLibrary:
    """The client library ``--kafka-client`` names."""
    if settings.kafka_client == "librdkafka":
        try:
            from worker.kafka_io.librdkafka import factories as librdkafka
        except ImportError as exc:
            raise StartupError(
                f"--kafka-client librdkafka needs confluent-kafka ({exc}); "
                "pip install 'clip-worker[librdkafka]' or use --kafka-client kafka-python"
            ) from None
        return ClientLibrary.of(librdkafka)
    return ClientLibrary.of(factories)


def open_consumer(settings: Settings, read_committed: bool = False) -> Consumer:
    """The worker's consumer; ``read_committed`` skips records of aborted transactions and waits for the
    offsets of one being committed."""
    return library(settings).open_consumer(settings, read_committed)


def open_reader(settings: Settings, read_committed: bool = False) -> Consumer:
    """A consumer outside any group that reads from the beginning and commits nothing (``tail``)."""
    return library(settings).open_reader(settings, read_committed)


def open_producer(
    settings: Settings, transactional_id: str | None = None, smallest_topic_limit: int | None = None
) -> Producer:
    """The worker's producer (transactional when ``transactional_id`` is given)."""
    return library(settings).open_producer(settings, transactional_id, smallest_topic_limit)


def topic_message_limits(settings: Settings, topics: list[str]) -> dict[str, int]:
    """Each topic's ``max.message.bytes`` as the broker reports it; topics it cannot tell are left out."""
    return library(settings).topic_message_limits(settings, topics)


def ensure_topics(settings: Settings, topics: dict[str, int], max_message_bytes: int | None = None) -> None:
    """Create topics that do not exist yet (``name -> partitions``); existing ones are left alone."""
    library(settings).ensure_topics(settings, topics, max_message_bytes)
