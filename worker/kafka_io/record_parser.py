"""The receive path's record parser: a record kafka-python cannot decode comes back marked, not raised.

kafka-python 3.0.12 parses a fetched v2 record batch one record at a time (``DefaultRecordBatch._read_msg``)
and raises on a record it cannot decode: a header name that is not UTF-8 (Kafka's Java client writes and
reads such names, so other producers can send them), a negative header count or header name size, a record
whose fields do not add up to its length. Its fetcher then raises the same error on every poll: the
partition never moves past the record, and the worker could only crash-loop.

:func:`read_record` reads a record as the client does, but when a record that its own length frames cannot
be decoded, it hands the record over with an :class:`UnreadableHeaders` list (empty, with the reason) in
place of its headers and goes on at the next record. Its key and value are those read (for a record whose
value could not be read, the record's raw bytes stand in as its value, so the dead letter keeps them).
:func:`marked_unreadable` turns such a record into the layer's
:class:`~worker.kafka_io.types.UnreadableRecord`, which the worker dead-letters.

A record that cannot even be framed (its length varint is broken, or it runs past the batch) still raises:
nothing after it can be found. The broker checks batch framing on append, so that takes a damaged log.
"""

from __future__ import annotations

from typing import Any

from kafka.errors import CorruptRecordError
from kafka.record.default_records import ControlRecord, DefaultRecord, DefaultRecordBatch
from kafka.record.util import decode_varint

from worker.kafka_io.types import Record, UnreadableRecord

STOCK_READ_MSG = DefaultRecordBatch._read_msg


class UnreadableHeaders(list[tuple[str, bytes | None]]):
    """The headers of a record the parser could not decode: none, and ``problem`` saying why."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        super().__init__()
        self.problem = problem


class _Undecodable(ValueError):
    """A field of a framed record cannot be decoded; ``key`` and ``value`` hold what was read before it."""

    def __init__(self, problem: str, key: bytes | None = None, value: bytes | None = None) -> None:
        super().__init__(problem)
        self.key = key
        self.value = value


def read_record(self: Any) -> DefaultRecord:
    """``DefaultRecordBatch._read_msg`` of kafka-python 3.0.12 that marks an undecodable record (see the
    module) instead of raising on it."""
    buffer = self._buffer
    length, start = decode_varint(buffer, self._pos)
    end = start + length
    if length < 0 or end > len(buffer):
        raise CorruptRecordError(f"a record of {length} bytes at {start} runs past its batch ({len(buffer)})")
    _attributes, pos = decode_varint(buffer, start)
    timestamp_delta, pos = decode_varint(buffer, pos)
    offset_delta, pos = decode_varint(buffer, pos)
    if self.timestamp_type == self.LOG_APPEND_TIME:
        timestamp = self.max_timestamp
    else:
        timestamp = self.first_timestamp + timestamp_delta
    offset = self.base_offset + offset_delta
    try:
        key, value, headers = _read_fields(buffer, pos, end)
    except (_Undecodable, ValueError, IndexError) as exc:
        key, value = (exc.key, exc.value) if isinstance(exc, _Undecodable) else (None, None)
        if value is None:
            value = bytes(buffer[start:end])  # the dead letter keeps the record's bytes
        headers = UnreadableHeaders(f"record at offset {offset} cannot be decoded: {exc}")
    self._pos = end
    kind = ControlRecord if self.is_control_batch else DefaultRecord
    return kind(length, offset, timestamp, self.timestamp_type, key, value, headers)


def _read_fields(
    buffer: bytearray, pos: int, end: int
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]:
    """Key, value and headers of the record whose fields start at ``pos`` and end at ``end``."""
    key, pos = _read_bytes(buffer, pos, end)
    value, pos = _read_bytes(buffer, pos, end)
    count, pos = decode_varint(buffer, pos)
    if count < 0:
        raise _Undecodable(f"invalid number of headers {count}", key, value)
    headers: list[tuple[str, bytes | None]] = []
    for _ in range(count):
        name, pos = _read_bytes(buffer, pos, end)
        if name is None:
            raise _Undecodable("a header without a name", key, value)
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise _Undecodable(f"header name {name[:64]!r} is not UTF-8", key, value) from None
        data, pos = _read_bytes(buffer, pos, end)
        headers.append((text, data))
    if pos != end:
        raise _Undecodable(f"its fields and its length differ by {end - pos} bytes", key, value)
    return key, value, headers


def _read_bytes(buffer: bytearray, pos: int, end: int) -> tuple[bytes | None, int]:
    size, pos = decode_varint(buffer, pos)
    if size < 0:
        return None, pos
    if pos + size > end:
        raise ValueError(f"a field of {size} bytes runs past the record")
    return bytes(buffer[pos : pos + size]), pos + size


def marked_unreadable(record: Record) -> Record:
    """``record`` itself, or, when :func:`read_record` could not decode it, an ``UnreadableRecord``."""
    headers = record.headers
    if type(headers) is not UnreadableHeaders:
        return record
    problem = headers.problem
    return UnreadableRecord(
        record.topic, record.partition, record.offset, record.timestamp, record.key, record.value, problem
    )


def install() -> None:
    """Put :func:`read_record` in place of the client's record reader (idempotent)."""
    DefaultRecordBatch._read_msg = read_record


def installed() -> bool:
    """Whether :func:`read_record` reads the client's records."""
    return DefaultRecordBatch._read_msg is read_record
