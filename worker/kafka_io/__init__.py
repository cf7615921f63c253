"""The Kafka layer: the only part of the worker that knows its Kafka client.

- :mod:`.types`: the client calls the worker makes, as Protocols, and ``TopicPartition``;
- :mod:`.errors`: the worker's own error types, translated from the client's;
- :mod:`.clients`: the one place that picks the client library (``--kafka-client``) and opens clients;
- :mod:`.adapters`: kafka-python behind those Protocols;
- :mod:`.factories`: kafka-python clients from the settings (also used by the tooling);
- :mod:`.librdkafka`: librdkafka (confluent-kafka) behind the same Protocols, with its own factories;
- :mod:`.receive_path` and :mod:`.record_parser`: the client's receive path with fewer copies, and a record
  parser that marks a record it cannot decode (an :class:`~.types.UnreadableRecord`) instead of raising.
"""

from worker.kafka_io.clients import (
    ensure_topics,
    open_consumer,
    open_producer,
    open_reader,
    topic_message_limits,
)
from worker.kafka_io.factories import (
    HEADER_OVERHEAD_BYTES,
    MAX_POLL_RECORDS,
    RECORD_OVERHEAD_BYTES,
    check_output_topics,
    common_options,
    consumer_options,
    make_admin,
    make_consumer,
    make_producer,
    producer_options,
    record_bytes,
    retry_until_deadline,
    security_options,
    transactional_producer_options,
)
from worker.kafka_io.logs import CLIENT_LOG_LEVELS, CLIENT_LOGGER
from worker.kafka_io.types import (
    Consumer,
    Headers,
    IgnoreRebalances,
    Producer,
    RebalanceListener,
    Record,
    TopicPartition,
    UnreadableRecord,
)

__all__ = [
    "CLIENT_LOGGER",
    "CLIENT_LOG_LEVELS",
    "HEADER_OVERHEAD_BYTES",
    "MAX_POLL_RECORDS",
    "RECORD_OVERHEAD_BYTES",
    "Consumer",
    "Headers",
    "IgnoreRebalances",
    "Producer",
    "RebalanceListener",
    "Record",
    "TopicPartition",
    "UnreadableRecord",
    "check_output_topics",
    "common_options",
    "consumer_options",
    "ensure_topics",
    "make_admin",
    "make_consumer",
    "make_producer",
    "open_consumer",
    "open_producer",
    "open_reader",
    "producer_options",
    "record_bytes",
    "retry_until_deadline",
    "security_options",
    "topic_message_limits",
    "transactional_producer_options",
]
