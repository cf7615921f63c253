"""The error taxonomy.

Every record the worker cannot embed is rejected with a :class:`RejectReason`. The reason's value is a
fixed vocabulary: it labels the DLQ metric and is written to the ``clip-worker-reason`` DLQ header, so
dashboards and downstream repair jobs can rely on it.
"""

from __future__ import annotations

import enum


class RejectReason(enum.StrEnum):
    """Why a record went to the dead-letter topic."""

    INVALID_MSGPACK = "invalid_msgpack"
    INVALID_ENVELOPE = "invalid_envelope"
    UNSUPPORTED_VERSION = "unsupported_version"
    EMPTY_IMAGE = "empty_image"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED_IMAGE = "truncated_image"
    CORRUPT_IMAGE = "corrupt_image"
    DECOMPRESSION_BOMB = "decompression_bomb"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_TOO_SMALL = "image_too_small"
    INFERENCE_FAILED = "inference_failed"
    OUTPUT_TOO_LARGE = "output_too_large"
    UNREADABLE_RECORD = "unreadable_record"
    INPUT_KIND_DISABLED = "input_kind_disabled"
    FETCH_FORBIDDEN = "fetch_forbidden"
    FETCH_NOT_FOUND = "fetch_not_found"
    FETCH_TIMEOUT = "fetch_timeout"
    FETCH_TOO_LARGE = "fetch_too_large"
    FETCH_FAILED = "fetch_failed"


class ExitCode(enum.IntEnum):
    """How the worker process ends; each failure its own code, so a supervisor can tell them apart."""

    OK = 0
    STARTUP = 2  # a configuration or start-up problem a user must fix; one line says which flag
    UNCLEAN_DRAIN = 3  # the shutdown grace ended with records unacknowledged (not committed)
    BROKER_LOST = 4  # the broker stopped answering past --broker-lost-timeout-s
    FENCED = 5  # another process took this worker's transactional or group instance id
    STAGE_FAILED = 6  # a thread the pipeline cannot go on without died
    DAMAGED_LOG = 7  # a fetched record batch failed its CRC or cannot be framed: nothing in it can be read
    INTERRUPTED = 130  # Ctrl-C before the worker was running


class RejectedRecord(Exception):
    """A record that cannot be embedded; it goes to the DLQ with this reason and message."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


class StartupError(Exception):
    """A problem a user must fix before the worker can start; printed as one line, exit code 2."""


class ModelLoadError(StartupError):
    """The model could not be loaded (missing, unreachable, or not a CLIP checkpoint)."""


class BrokerUnavailableError(StartupError):
    """No broker answered before the connection deadline."""


class BrokerLostError(Exception):
    """The broker stopped answering mid-run for longer than ``--broker-lost-timeout-s``."""


class StageFailedError(Exception):
    """A thread the pipeline cannot go on without died (a bug): the worker exits without committing."""


class FencedError(Exception):
    """Another process took this worker's identity in the group or the broker; it must not go on."""


class GroupInstanceFencedError(FencedError):
    """Another consumer joined the group with this worker's ``--group-instance-id``."""


class TransactionFencedError(FencedError):
    """Exactly-once mode cannot go on: another producer took this transactional id, or the broker refused
    transactions. The open transaction is aborted by the broker; nothing it holds is ever visible."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (at most 200 characters), or its type's name: what a one-line
    startup error quotes of a library's exception."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
