"""kafka-python client factories: security options, size limits, start-up retries, topic creation.

The sizes and the start-up retries are the worker's, whichever client runs: librdkafka's factories
(:mod:`worker.kafka_io.librdkafka`) use them too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from worker.config import Settings
from worker.errors import BrokerUnavailableError, StartupError
from worker.kafka_io import receive_path
from worker.kafka_io.adapters import ConsumerAdapter, ProducerAdapter
from worker.kafka_io.errors import KafkaLayerError
from worker.kafka_io.partitioner import KeyHashPartitioner
from worker.kafka_io.types import Producer

log = logging.getLogger(__name__)
T = TypeVar("T")
_ATTEMPT_TIMEOUT_S = 5.0
MAX_POLL_RECORDS = 500
# Bytes a record batch of one record adds to its key, value and headers (batch header, varints), rounded
# up; each header adds its name, value and two varints on top.
RECORD_OVERHEAD_BYTES = 128
HEADER_OVERHEAD_BYTES = 10
_PRODUCER_BATCH_BYTES = 256 * 1024


def record_bytes(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    """An upper bound of the size the broker checks against ``max.message.bytes`` for this one record."""
    size = RECORD_OVERHEAD_BYTES + len(key or b"") + len(value or b"")
    for name, data in headers:
        size += len(name.encode()) + len(data) + HEADER_OVERHEAD_BYTES
    return size


def security_options(settings: Settings) -> dict[str, Any]:
    """kafka-python keyword arguments for the configured security protocol."""
    options: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if settings.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        assert settings.sasl_password is not None  # checked by Settings
        options["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    if settings.security_protocol.endswith("SSL"):
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(settings, name)
            if value is not None:
                options[name] = str(value)
        if settings.ssl_password is not None:
            options["ssl_password"] = settings.ssl_password.get_secret_value()
    return options


def attempt_timeout_s(settings: Settings) -> float:
    """How long one start-up attempt to reach the brokers may take."""
    # Several attempts fit in the deadline, so the user sees a line per attempt rather than one long wait.
    return min(_ATTEMPT_TIMEOUT_S, max(1.0, settings.connect_timeout_s / 4))


def fetch_max_bytes(settings: Settings) -> int:
    """The most one fetch response may carry: a whole largest record, and room for many images."""
    return max(settings.max_message_bytes, 64 * 1024 * 1024)


def producer_batch_bytes(smallest_topic_limit: int | None) -> int:
    """The producer's batch size: under ``smallest_topic_limit`` (the lowest ``max.message.bytes`` of the
    topics it writes), so the broker never refuses a batch that only its sum made too large."""
    if smallest_topic_limit is None:
        return _PRODUCER_BATCH_BYTES
    return max(1024, min(_PRODUCER_BATCH_BYTES, smallest_topic_limit - RECORD_OVERHEAD_BYTES))


def common_options(settings: Settings) -> dict[str, Any]:
    """Options shared by every client: servers, client id, security, bootstrap timeout per attempt."""
    return {
        "bootstrap_servers": settings.bootstrap_servers.split(","),
        "client_id": settings.client_id,
        "bootstrap_timeout_ms": int(attempt_timeout_s(settings) * 1000),
        "metadata_max_age_ms": settings.metadata_max_age_ms,
        **security_options(settings),
    }


def consumer_options(settings: Settings) -> dict[str, Any]:
    """Consumer options of the worker: manual commits, cooperative rebalancing, image-sized fetches."""
    options = {
        **common_options(settings),
        "group_id": settings.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": settings.auto_offset_reset,
        "max_partition_fetch_bytes": settings.max_message_bytes,
        "fetch_max_bytes": fetch_max_bytes(settings),
        "max_poll_records": MAX_POLL_RECORDS,
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": max(100, settings.session_timeout_ms // 3),
        "partition_assignment_strategy": (CooperativeStickyAssignor,),
    }
    if settings.group_instance_id:
        options["group_instance_id"] = settings.group_instance_id
    return options


def producer_options(settings: Settings, smallest_topic_limit: int | None = None) -> dict[str, Any]:
    """Producer options: acks from all replicas, image-sized requests, small linger.

    With ``smallest_topic_limit`` (the lowest ``max.message.bytes`` of the topics it writes), batches of
    several records stay under it, so the broker never refuses a batch that only its sum made too large.
    """
    return {
        **common_options(settings),
        "acks": "all",
        # Delivery is at-least-once and deduplicated by id downstream; kafka-python's idempotent producer
        # treats one over-sized record as fatal and fails every later send, which would stall the worker.
        "enable_idempotence": False,
        "linger_ms": 5,
        # Room for a dead-lettered input (up to the fetch limit) plus its headers; outputs are checked
        # against --max-message-bytes before they are sent.
        "max_request_size": 2 * settings.max_message_bytes,
        "batch_size": producer_batch_bytes(smallest_topic_limit),
        # The default partitioner's choice of partition, hashing keys without kafka-python's slow murmur2.
        "partitioner": KeyHashPartitioner(),
        # Bounds how long a send (and the start-up topic check) waits for metadata of a missing topic.
        "max_block_ms": 15_000,
    }


def transactional_producer_options(
    settings: Settings, transactional_id: str, smallest_topic_limit: int | None = None
) -> dict[str, Any]:
    """Producer options of the exactly-once mode: idempotent, transactional."""
    options = producer_options(settings, smallest_topic_limit)
    options.update(
        enable_idempotence=True,
        transactional_id=transactional_id,
        # The broker aborts a transaction its producer left open (a crash) after this long; the worker
        # commits every --commit-interval-ms, so this is only a bound for crashes without a restart.
        transaction_timeout_ms=max(60_000, 10 * settings.commit_interval_ms),
    )
    return options


class _ConnectionFailures(logging.Handler):
    """Remembers failures that retrying cannot heal. kafka-python's bootstrap only says "unable to
    bootstrap" and logs why, so the reason (bad credentials, untrusted certificate) is read back here."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.fatal: str = ""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "Authentication" in text or "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify" in text:
            self.fatal = text


_failures = _ConnectionFailures()
_network_log = logging.getLogger("kafka.net")
_network_log.addHandler(_failures)
_network_log.propagate = False  # one line per attempt comes from retry_until_deadline instead


def fatal_reason(servers: str, text: str) -> str | None:
    """A one-line fix when ``text``, the client's word on the last failure, says that retrying cannot
    heal it (credentials, TLS trust)."""
    if "Authentication" in text:
        return (
            f"authentication to {servers} failed; check --sasl-username, --sasl-password and --sasl-mechanism"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return f"the TLS certificate of {servers} is not trusted; check --ssl-cafile"
    return None


def retry_until_deadline(
    what: str,
    factory: Callable[[], T],
    deadline_s: float,
    servers: str,
    last_failure: Callable[[], str] = lambda: _failures.fatal,
) -> T:
    """Call ``factory`` until it succeeds, logging one line per failed attempt, backing off up to 5 s.

    ``last_failure`` gives the client's word on why the last attempt failed: a failure that retrying
    cannot heal (see :func:`fatal_reason`) raises :class:`StartupError` at once. Raises
    :class:`BrokerUnavailableError` once ``deadline_s`` has passed.
    """
    started = time.monotonic()
    attempt = 0
    backoff = 0.5
    # Kept across attempts: the client's I/O thread may log why an attempt failed after it has failed.
    _failures.fatal = ""
    while True:
        attempt += 1
        try:
            return factory()
        except (KafkaError, KafkaLayerError) as exc:
            fatal = fatal_reason(servers, last_failure())
            if fatal:
                raise StartupError(fatal) from None
            waited = time.monotonic() - started
            if waited + backoff >= deadline_s:
                raise BrokerUnavailableError(
                    f"no Kafka broker at {servers} answered within {deadline_s:.0f}s ({exc}); "
                    "check --bootstrap-servers and the security flags, or raise --connect-timeout-s"
                ) from None
            log.warning(
                "%s: broker %s not reachable (attempt %d, %s); retrying in %.1fs",
                what,
                servers,
                attempt,
                type(exc).__name__,
                backoff,
            )
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


def make_consumer(settings: Settings, **overrides: Any) -> KafkaConsumer:
    """A consumer (not yet subscribed), retried until ``connect_timeout_s``."""
    options = {**consumer_options(settings), **overrides}
    receive_path.install()  # fewer copies of every fetched byte (kafka-python 3.0.12; others left alone)
    return retry_until_deadline(
        "consumer", lambda: KafkaConsumer(**options), settings.connect_timeout_s, settings.bootstrap_servers
    )


def make_producer(
    settings: Settings, transactional_id: str | None = None, smallest_topic_limit: int | None = None
) -> KafkaProducer:
    """A producer (transactional when ``transactional_id`` is given), retried until ``connect_timeout_s``."""
    if transactional_id is None:
        options = producer_options(settings, smallest_topic_limit)
    else:
        options = transactional_producer_options(settings, transactional_id, smallest_topic_limit)
    receive_path.install()
    return retry_until_deadline(
        "producer", lambda: KafkaProducer(**options), settings.connect_timeout_s, settings.bootstrap_servers
    )


def open_consumer(settings: Settings, read_committed: bool = False) -> ConsumerAdapter:
    """The worker's consumer, behind the Kafka layer's Protocol; ``read_committed`` skips records of
    aborted transactions and waits for the offsets of one being committed."""
    return ConsumerAdapter(make_consumer(settings, isolation_level=_isolation(read_committed)))


def open_reader(settings: Settings, read_committed: bool = False) -> ConsumerAdapter:
    """A consumer outside any group that reads from the beginning and commits nothing (``tail``)."""
    reader = make_consumer(
        settings, group_id=None, auto_offset_reset="earliest", isolation_level=_isolation(read_committed)
    )
    return ConsumerAdapter(reader)


def _isolation(read_committed: bool) -> str:
    return "read_committed" if read_committed else "read_uncommitted"


def open_producer(
    settings: Settings, transactional_id: str | None = None, smallest_topic_limit: int | None = None
) -> ProducerAdapter:
    """The worker's producer, behind the Kafka layer's Protocol."""
    return ProducerAdapter(make_producer(settings, transactional_id, smallest_topic_limit))


def check_output_topics(producer: Producer, settings: Settings) -> None:
    """Fail start-up with a one-line fix if a topic the worker writes to (output, NSFW, DLQ) does not exist
    (and is not auto-created).

    Sending to a missing topic blocks each send for the producer's metadata timeout, so the worker
    refuses to start rather than stall every batch.
    """
    for flag, topic in settings.output_topics():
        if not producer.topic_exists(topic):
            raise StartupError(
                f"topic {topic!r} does not exist on {settings.bootstrap_servers}; create it or fix {flag}"
            )


def make_admin(settings: Settings) -> KafkaAdminClient:
    """An admin client, retried until ``connect_timeout_s``."""
    return retry_until_deadline(
        "admin",
        lambda: KafkaAdminClient(**common_options(settings)),
        settings.connect_timeout_s,
        settings.bootstrap_servers,
    )


def topic_message_limits(settings: Settings, topics: list[str]) -> dict[str, int]:
    """Each topic's ``max.message.bytes`` as the broker reports it; topics it cannot tell are left out.

    The worker checks records against these before sending: a refusal by the broker would cost a round
    trip, and in exactly-once mode a whole transaction.
    """
    admin = make_admin(settings)
    try:
        resources = [ConfigResource(ConfigResourceType.TOPIC, t, ["max.message.bytes"]) for t in topics]
        described = admin.describe_configs(resources, config_filter="all")
    except KafkaConnectionError as exc:
        # Brokers that do not implement DescribeConfigs (Tansu, the demo's) drop the connection: nothing an
        # operator can change, and a record over a limit is still caught when the broker refuses it.
        log.info("the broker did not report max.message.bytes of %s (%s); refusals will tell", topics, exc)
        return {}
    except KafkaError as exc:  # refused (authorization, say): worth an operator's look
        log.warning("cannot read max.message.bytes of %s (%s); relying on the broker's refusals", topics, exc)
        return {}
    finally:
        admin.close()
    limits: dict[str, int] = {}
    for name, configs in described.get("topic", {}).items():
        value = configs.get("max.message.bytes", {}).get("value")
        if value is not None:
            limits[name] = int(value)
    return limits


def ensure_topics(settings: Settings, topics: dict[str, int], max_message_bytes: int | None = None) -> None:
    """Create topics that do not exist yet (``name -> partitions``); existing ones are left alone."""
    admin = make_admin(settings)
    try:
        limit = str(max_message_bytes or settings.max_message_bytes)
        for name, partitions in topics.items():
            try:
                admin.create_topics(
                    {name: {"num_partitions": partitions, "configs": {"max.message.bytes": limit}}},
                    wait_for_metadata=True,
                )
                log.info("created topic %s with %d partition(s)", name, partitions)
            except TopicAlreadyExistsError:
                pass
    except KafkaError as exc:
        raise StartupError(f"cannot create topics {sorted(topics)}: {exc}") from None
    finally:
        admin.close()
