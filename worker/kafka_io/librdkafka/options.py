"""The worker's settings as librdkafka configuration: the same behaviour as kafka-python's options in
:mod:`worker.kafka_io.factories`, in librdkafka's words.

One set of flags serves both clients; this module is where they are spelled for librdkafka.
"""

from __future__ import annotations

import logging
from typing import Any

from worker.config import Settings
from worker.kafka_io.factories import (
    MAX_POLL_RECORDS,
    attempt_timeout_s,
    fetch_max_bytes,
    producer_batch_bytes,
)

# Under the client's logger root (worker.kafka_io.logs.CLIENT_LOGGER): the worker's log set-up holds it
# and its repeats as it does kafka-python's.
LOGGER = logging.getLogger("kafka.librdkafka")
# librdkafka's own cap on a request (message.max.bytes) and a response (receive.message.max.bytes).
_MAX_REQUEST_BYTES = 1_000_000_000
_MAX_RESPONSE_BYTES = 2_147_483_647
# How long a record may wait for its acknowledgement before its delivery fails (kafka-python's default
# delivery timeout); the worker then retries it.
DELIVERY_TIMEOUT_MS = 120_000
# librdkafka requires a Java-compatible partitioner to be named: murmur2 for keyed records (the partition
# kafka-python and the Java client choose), random for records without a key.
PARTITIONER = "murmur2_random"


def security_options(settings: Settings) -> dict[str, Any]:
    """librdkafka's properties for the configured security protocol (the flags of kafka-python's)."""
    options: dict[str, Any] = {"security.protocol": settings.security_protocol}
    if settings.security_protocol.startswith("SASL_"):
        assert settings.sasl_password is not None  # checked by Settings
        options["sasl.mechanism"] = settings.sasl_mechanism
        options["sasl.username"] = settings.sasl_username
        options["sasl.password"] = settings.sasl_password.get_secret_value()
    if settings.security_protocol.endswith("SSL"):
        files = {
            "ssl_cafile": "ssl.ca.location",
            "ssl_certfile": "ssl.certificate.location",
            "ssl_keyfile": "ssl.key.location",
        }
        for field, name in files.items():
            value = getattr(settings, field)
            if value is not None:
                options[name] = str(value)
        if settings.ssl_password is not None:
            options["ssl.key.password"] = settings.ssl_password.get_secret_value()
    return options


def common_options(settings: Settings) -> dict[str, Any]:
    """Properties of every client: servers, client id, security, metadata refresh, connect timeout."""
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        "topic.metadata.refresh.interval.ms": settings.metadata_max_age_ms,
        "socket.connection.setup.timeout.ms": int(attempt_timeout_s(settings) * 1000),
        "logger": LOGGER,
        **security_options(settings),
    }


def consumer_options(settings: Settings, read_committed: bool) -> dict[str, Any]:
    """The worker's consumer: manual commits of the offsets it names, cooperative rebalancing,
    image-sized fetches."""
    fetch_max = min(fetch_max_bytes(settings), _MAX_RESPONSE_BYTES - 1024 * 1024)
    options = {
        **common_options(settings),
        "group.id": settings.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": settings.auto_offset_reset,
        "max.partition.fetch.bytes": settings.max_message_bytes,
        "fetch.max.bytes": fetch_max,
        "receive.message.max.bytes": fetch_max + 1024 * 1024,
        "max.poll.interval.ms": settings.max_poll_interval_ms,
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": max(100, settings.session_timeout_ms // 3),
        "partition.assignment.strategy": "cooperative-sticky",
        "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        # Prefetch about what one poll takes, not librdkafka's default 100k records per partition.
        "queued.min.messages": MAX_POLL_RECORDS,
        # Once a partition's queue holds that much, librdkafka waits this long before it looks again
        # (default 1000 ms): the worker drained 500 records in far less and then starved, capping it at
        # ~2,400 records/s of 50 KB where 10 ms gave 3,500-4,400 (the host-ceiling bench section).
        "fetch.queue.backoff.ms": 10,
    }
    if settings.group_instance_id:
        options["group.instance.id"] = settings.group_instance_id
    return options


def producer_options(settings: Settings, smallest_topic_limit: int | None = None) -> dict[str, Any]:
    """The worker's producer: acks from all replicas, image-sized requests, small linger, the Java
    client's partitions for keyed records."""
    return {
        **common_options(settings),
        "acks": "all",
        # As with kafka-python: at-least-once is deduplicated by id downstream, no idempotence needed.
        "enable.idempotence": False,
        "linger.ms": 5,
        "message.max.bytes": min(2 * settings.max_message_bytes, _MAX_REQUEST_BYTES),
        "batch.size": producer_batch_bytes(smallest_topic_limit),
        "partitioner": PARTITIONER,
        "message.timeout.ms": DELIVERY_TIMEOUT_MS,
    }


def transactional_producer_options(
    settings: Settings, transactional_id: str, smallest_topic_limit: int | None = None
) -> dict[str, Any]:
    """The exactly-once mode's producer: idempotent, transactional."""
    timeout_ms = max(60_000, 10 * settings.commit_interval_ms)
    options = producer_options(settings, smallest_topic_limit)
    options.update(
        {
            "enable.idempotence": True,
            "transactional.id": transactional_id,
            "transaction.timeout.ms": timeout_ms,
            # librdkafka refuses a delivery timeout longer than the transaction's.
            "message.timeout.ms": min(DELIVERY_TIMEOUT_MS, timeout_ms),
        }
    )
    return options
