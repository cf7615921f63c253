"""librdkafka clients from the settings: the consumer, the reader, the producer, the admin calls.

librdkafka connects in the background and never fails a constructor for an unreachable broker, so each
client is asked for the cluster's metadata first, attempt by attempt until ``--connect-timeout-s``, as
kafka-python's bootstrap is: the same log lines, the same exits.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public names its stubs do not export
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from worker.config import Settings
from worker.errors import StartupError
from worker.kafka_io.errors import UnansweredError
from worker.kafka_io.factories import attempt_timeout_s, retry_until_deadline
from worker.kafka_io.librdkafka import options
from worker.kafka_io.librdkafka.consumer import ConsumerAdapter, reader_group
from worker.kafka_io.librdkafka.errors import translate
from worker.kafka_io.librdkafka.producer import ProducerAdapter

log = logging.getLogger(__name__)
_ADMIN_TIMEOUT_S = 15.0
_CREATED_WAIT_S = 10.0


class _LastError:
    """librdkafka's ``error_cb``: keeps its last word on a failure (why a connection was refused) for the
    start-up retries, which tell an unreachable broker from bad credentials or an untrusted certificate."""

    def __init__(self) -> None:
        self.text = ""

    def __call__(self, error: KafkaError) -> None:
        text = f"{error.name()}: {error.str()}"
        log.debug("librdkafka: %s", text)
        if error.code() != KafkaError._ALL_BROKERS_DOWN:  # the outcome of a failure, not its reason
            self.text = text


def _connected(what: str, settings: Settings, make: Any, config: dict[str, Any]) -> Any:
    """A client made by ``make(config)`` once it has read the cluster's metadata."""
    last = _LastError()
    client = make({**config, "error_cb": last})
    attempt_s = attempt_timeout_s(settings)

    def probe() -> Any:
        try:
            client.list_topics(timeout=attempt_s)
        except KafkaException as exc:
            # librdkafka reports why a connection failed (bad credentials, an untrusted certificate)
            # through error_cb, which only poll serves, and list_topics does not: serve it now.
            client.poll(0)
            raise translate(exc) from exc
        return client

    return retry_until_deadline(
        what, probe, settings.connect_timeout_s, settings.bootstrap_servers, lambda: last.text
    )


def open_consumer(settings: Settings, read_committed: bool = False) -> ConsumerAdapter:
    """The worker's consumer (not yet subscribed)."""
    config = options.consumer_options(settings, read_committed)
    return ConsumerAdapter(_connected("consumer", settings, Consumer, config))


def open_reader(settings: Settings, read_committed: bool = False) -> ConsumerAdapter:
    """A consumer outside any group that reads from the beginning and commits nothing (``tail``)."""
    config = {
        **options.consumer_options(settings, read_committed),
        "group.id": reader_group(),
        "auto.offset.reset": "earliest",
    }
    config.pop("group.instance.id", None)
    return ConsumerAdapter(_connected("consumer", settings, Consumer, config), reader=True)


def open_producer(
    settings: Settings, transactional_id: str | None = None, smallest_topic_limit: int | None = None
) -> ProducerAdapter:
    """The worker's producer (transactional when ``transactional_id`` is given)."""
    if transactional_id is None:
        config = options.producer_options(settings, smallest_topic_limit)
    else:
        config = options.transactional_producer_options(settings, transactional_id, smallest_topic_limit)
    return ProducerAdapter(_connected("producer", settings, Producer, config))


def make_admin(settings: Settings) -> AdminClient:
    """An admin client that has reached the cluster."""
    admin: AdminClient = _connected("admin", settings, AdminClient, options.common_options(settings))
    return admin


def topic_message_limits(settings: Settings, topics: list[str]) -> dict[str, int]:
    """Each topic's ``max.message.bytes`` as the broker reports it; topics it cannot tell are left out."""
    admin = make_admin(settings)
    resources = [ConfigResource(ResourceType.TOPIC, topic) for topic in topics]
    limits: dict[str, int] = {}
    try:
        futures = admin.describe_configs(resources, request_timeout=_ADMIN_TIMEOUT_S)
    except KafkaException as exc:
        log.warning("cannot read max.message.bytes of %s (%s); relying on the broker's refusals", topics, exc)
        return {}
    for resource, future in futures.items():
        try:
            entries = future.result(timeout=_ADMIN_TIMEOUT_S)
        except KafkaException as exc:
            error = translate(exc)
            level = logging.INFO if isinstance(error, UnansweredError) else logging.WARNING
            log.log(level, "the broker did not report max.message.bytes of %s (%s)", resource.name, error)
            continue
        entry = entries.get("max.message.bytes")
        if entry is not None and entry.value is not None:
            limits[resource.name] = int(entry.value)
    return limits


def ensure_topics(settings: Settings, topics: dict[str, int], max_message_bytes: int | None = None) -> None:
    """Create topics that do not exist yet (``name -> partitions``); existing ones are left alone."""
    admin = make_admin(settings)
    limit = str(max_message_bytes or settings.max_message_bytes)
    wanted = [
        NewTopic(name, partitions, replication_factor=-1, config={"max.message.bytes": limit})
        for name, partitions in topics.items()
    ]
    created = []
    for name, future in admin.create_topics(wanted, request_timeout=_ADMIN_TIMEOUT_S).items():
        try:
            future.result(timeout=_ADMIN_TIMEOUT_S)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise StartupError(f"cannot create topics {sorted(topics)}: {translate(exc)}") from None
        log.info("created topic %s with %d partition(s)", name, topics[name])
        created.append(name)
    _wait_until_known(admin, created)


def _wait_until_known(admin: AdminClient, topics: list[str]) -> None:
    """Wait until the metadata names every topic just created (as kafka-python's wait_for_metadata)."""
    deadline = time.monotonic() + _CREATED_WAIT_S
    while topics and time.monotonic() < deadline:
        try:
            known = admin.list_topics(timeout=_CREATED_WAIT_S).topics
        except KafkaException as exc:
            raise StartupError(f"cannot list topics: {translate(exc)}") from None
        if all(topic in known and known[topic].error is None for topic in topics):
            return
        time.sleep(0.1)
