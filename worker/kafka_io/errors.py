"""The worker's own Kafka error types: what the runtime needs to tell apart, whatever the client says.

:func:`translate` maps kafka-python's exceptions onto them; nothing outside this package sees the client's.
"""

from __future__ import annotations

from kafka import errors as client


class KafkaLayerError(Exception):
    """Any failure of a Kafka call; the specific kinds below say what the worker can do about it."""


class RecordTooLargeError(KafkaLayerError):
    """The broker (or the client, before sending) refused a record as too large for its topic."""


class UnansweredError(KafkaLayerError):
    """The broker did not answer in time, or the connection to it failed: it may be gone."""


class UnsendableRecordError(KafkaLayerError):
    """The client refused the record itself (both key and value null, a header it cannot encode):
    sending it again fails the same way."""


class ProducerFencedError(KafkaLayerError):
    """Another producer registered this transactional id."""


class TransactionsRefusedError(KafkaLayerError):
    """The broker refuses this producer's transactions (authorisation, unsupported version, bad state)."""


class InstanceFencedError(KafkaLayerError):
    """Another consumer joined the group with this consumer's group instance id."""


class UnreadableRecordError(KafkaLayerError):
    """The client could not parse fetched records: a batch its CRC or its framing gives up on (a record
    that can be framed is handed over as an :class:`~worker.kafka_io.types.UnreadableRecord` instead)."""


_UNANSWERED = (
    client.KafkaTimeoutError,
    client.KafkaConnectionError,
    client.NodeNotReadyError,
    client.RequestTimedOutError,
)
_TRANSACTIONS_REFUSED = (
    client.TransactionalIdAuthorizationFailedError,
    client.ClusterAuthorizationFailedError,
    client.InvalidTxnStateError,
    client.UnsupportedForMessageFormatError,
    client.UnsupportedVersionError,
)


def translate(exc: BaseException) -> BaseException:
    """The worker's error for a client exception (the exception itself when it is not the client's)."""
    if isinstance(exc, KafkaLayerError) or not isinstance(exc, client.KafkaError):
        return exc
    kind: type[KafkaLayerError] = KafkaLayerError
    if isinstance(exc, client.MessageSizeTooLargeError):
        kind = RecordTooLargeError
    elif isinstance(exc, _UNANSWERED):
        kind = UnansweredError
    elif isinstance(exc, client.ProducerFencedError):
        kind = ProducerFencedError
    elif isinstance(exc, _TRANSACTIONS_REFUSED):
        kind = TransactionsRefusedError
    elif isinstance(exc, client.FencedInstanceIdError):
        kind = InstanceFencedError
    elif isinstance(exc, client.CorruptRecordError):
        kind = UnreadableRecordError
    translated = kind(f"{type(exc).__name__}: {exc}")
    translated.__cause__ = exc
    return translated
