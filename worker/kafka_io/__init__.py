"""The Kafka layer: the only part of the worker that knows its Kafka client.

- :mod:`.types`: the client calls the worker makes, as Protocols, and ``TopicPartition``;
- :mod:`.errors`: the worker's own error types, translated from the client's;
- :mod:`.adapters`: kafka-python behind those Protocols;
- :mod:`.factories`: kafka-python clients from the settings (also used by the tooling);
- :mod:`.receive_path` and :mod:`.record_parser`: the client's receive path with fewer copies, and a record
  parser that marks a record it cannot decode (an :class:`~.types.UnreadableRecord`) instead of raising.
"""

from worker.kafka_io.factories import (
    HEADER_OVERHEAD_BYTES,
    MAX_POLL_RECORDS,
    RECORD_OVERHEAD_BYTES,
    check_output_topics,
    common_options,
    consumer_options,
    ensure_topics,
    make_admin,
    make_consumer,
    make_producer,
    open_consumer,
    open_producer,
    open_reader,
    producer_options,
    record_bytes,
    retry_until_deadline,
    security_options,
    topic_message_limits,
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
