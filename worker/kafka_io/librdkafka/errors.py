"""librdkafka's errors as the Kafka layer's own (:mod:`worker.kafka_io.errors`).

librdkafka classes every error itself: *fatal* (the client instance is unusable: a fenced producer or
group member, a refused transactional id), *abortable* (``txn_requires_abort``: the open transaction must
be aborted) and *retriable* (try the call again). Those classes map onto the worker's paths: fatal to its
exit, abortable to its abort-and-re-read, retriable (and the transport's own codes) to
:class:`~worker.kafka_io.errors.UnansweredError`, the broker-may-be-gone wait.
"""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException

from worker.kafka_io.errors import (
    InstanceFencedError,
    KafkaLayerError,
    ProducerFencedError,
    RecordTooLargeError,
    TransactionsRefusedError,
    UnansweredError,
    UnreadableRecordError,
)

_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE}
_PRODUCER_FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED}
# An epoch the broker no longer takes: fencing when librdkafka gives up (fatal); abortable when it can bump
# the epoch itself (KIP-360), and the transaction's abort then goes on with the same producer.
_STALE_EPOCH = KafkaError.INVALID_PRODUCER_EPOCH
_TRANSACTIONS_REFUSED = {
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.UNSUPPORTED_VERSION,
    KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
}
_UNANSWERED = {
    KafkaError._MSG_TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
    KafkaError._TIMED_OUT_QUEUE,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._WAIT_COORD,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NETWORK_EXCEPTION,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR,
}
# Codes about one record at its offset: the record is dead-lettered, the partition goes on.
RECORD_LEVEL = {KafkaError._BAD_MSG, KafkaError._BAD_COMPRESSION, KafkaError.INVALID_RECORD}


def layer_error(error: KafkaError) -> KafkaLayerError:
    """The worker's error for one of librdkafka's (a delivery report's, a message's, a call's)."""
    code = error.code()
    text = f"{error.name()}: {error.str()}"
    kind: type[KafkaLayerError] = KafkaLayerError
    if code in _TOO_LARGE:
        kind = RecordTooLargeError
    elif code == KafkaError.FENCED_INSTANCE_ID or "FENCED_INSTANCE_ID" in text:
        kind = InstanceFencedError
    elif code in _PRODUCER_FENCED or (code == _STALE_EPOCH and error.fatal()):
        kind = ProducerFencedError
    elif code in _TRANSACTIONS_REFUSED or error.fatal():
        kind = TransactionsRefusedError
    elif error.txn_requires_abort():
        kind = KafkaLayerError  # the caller's abort path: nothing more specific to say
    elif code in _UNANSWERED or error.retriable():
        kind = UnansweredError
    elif code in RECORD_LEVEL:
        kind = UnreadableRecordError
    return kind(text)


def translate(exc: BaseException) -> BaseException:
    """The worker's error for a ``KafkaException`` (any other exception is returned as it is)."""
    if not isinstance(exc, KafkaException):
        return exc
    error = exc.args[0] if exc.args else None
    if not isinstance(error, KafkaError):
        translated: KafkaLayerError = KafkaLayerError(str(exc))
    else:
        translated = layer_error(error)
    translated.__cause__ = exc
    return translated
