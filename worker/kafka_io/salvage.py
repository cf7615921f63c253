"""Reading past a record batch that kafka-python refuses to parse.

kafka-python raises a parse failure (a header name that is not UTF-8, say) from deep in its fetcher
without saying where, and raises it again on every poll; it parses whole batches, so seeking past the
record does not help. The failing frames still hold the batch (its buffer, position and base offset) and
its partition, so the rest of the batch is read here, the client's own v2 layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kafka.record.util import decode_varint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SalvagedRecord:
    """A record of a batch the client gave up on, read here; ``error`` says why the client could not."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    error: str | None


@dataclass(frozen=True)
class SalvagedBatch:
    """The rest of a record batch from the record the client failed on, and where the batch ends."""

    records: list[SalvagedRecord]
    next_offset: int


def salvage_batch(exc: BaseException) -> SalvagedBatch | None:
    """Read the rest of the batch that made ``poll()`` raise ``exc``, so that the failing record can be
    dead-lettered and the records after it processed.

    None when the batch cannot be found (another client version): the caller then lets the error stop the
    worker rather than skip blindly.
    """
    batch: Any = None
    tp: Any = None
    for frame in _frames(exc):
        owner: Any = frame.f_locals.get("self")
        if tp is None and hasattr(owner, "topic_partition"):
            tp = owner.topic_partition
        if batch is None and all(hasattr(owner, a) for a in ("_buffer", "_pos", "_next_record_index")):
            batch = owner
    if batch is None or tp is None:
        return None
    try:
        records = _read_rest(batch, tp.topic, tp.partition, f"{type(exc).__name__}: {exc}")
        return SalvagedBatch(records, int(batch.next_offset))
    except Exception:  # a batch even this reader cannot make sense of
        log.exception("cannot read the rest of the batch the Kafka client refused")
        return None


def _frames(exc: BaseException) -> list[Any]:
    frames: list[Any] = []
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        trace = error.__traceback__
        while trace is not None:
            frames.append(trace.tb_frame)
            trace = trace.tb_next
        error = error.__context__ or error.__cause__
    return frames


def _read_rest(batch: Any, topic: str, partition: int, error: str) -> list[SalvagedRecord]:
    """Records ``batch._next_record_index`` onwards of a v2 record batch (the client's own layout)."""
    buffer, pos = bytes(batch._buffer), batch._pos
    records = []
    for _ in range(batch._next_record_index, batch._num_records):
        length, pos = decode_varint(buffer, pos)
        end = pos + length
        pos += 1  # attributes
        timestamp_delta, pos = decode_varint(buffer, pos)
        offset_delta, pos = decode_varint(buffer, pos)
        key, pos = _read_bytes(buffer, pos)
        value, pos = _read_bytes(buffer, pos)
        count, pos = decode_varint(buffer, pos)
        headers: list[tuple[str, bytes]] = []
        problem = None
        for _header in range(count):
            name, pos = _read_bytes(buffer, pos)
            data, pos = _read_bytes(buffer, pos)
            try:
                headers.append(((name or b"").decode("utf-8"), data or b""))
            except UnicodeDecodeError:
                problem = error
        if pos != end:
            raise ValueError(f"record ends at {pos}, expected {end}")
        timestamp = int(batch.first_timestamp) + timestamp_delta
        offset = int(batch.base_offset) + offset_delta
        records.append(SalvagedRecord(topic, partition, offset, timestamp, key, value, headers, problem))
    return records


def _read_bytes(buffer: bytes, pos: int) -> tuple[bytes | None, int]:
    size, pos = decode_varint(buffer, pos)
    if size < 0:
        return None, pos
    return buffer[pos : pos + size], pos + size
