"""The receive path's record parser reads what kafka-python reads, and marks what kafka-python raises on."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from worker.kafka_io import TopicPartition, UnreadableRecord
from worker.kafka_io.adapters import ConsumerAdapter
from worker.kafka_io.record_parser import STOCK_READ_MSG, UnreadableHeaders, read_record

Header = tuple[str, bytes | None]
# key b"k", value b"v", one header "h" = b"x": the bytes after the record's attributes and deltas.
PLAIN_FIELDS = b"\x02k\x02v\x02\x02h\x02x"


class NotUtf8(str):
    """A header name whose UTF-8 form is not UTF-8: how another client can write a name kafka-python
    cannot read back."""

    def encode(self, *_args: Any, **_kwargs: Any) -> bytes:
        return b"\xff\xfe-bad"


Fields = tuple[bytes | None, bytes | None, list[Header]]


def batch_bytes(records: Sequence[Fields], gzip: bool = False) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=1 if gzip else 0, is_transactional=False, producer_id=-1,
        producer_epoch=-1, base_sequence=-1, batch_size=1 << 30,
    )  # fmt: skip
    for index, (key, value, headers) in enumerate(records):
        builder.append(index, timestamp=1000 + index, key=key, value=value, headers=headers)
    return bytes(builder.build())


def read(data: bytes, reader: Any = read_record) -> list[Any]:
    """The records of a batch as the fetcher iterates them, with ``reader`` as the batch's record reader."""
    saved = DefaultRecordBatch._read_msg
    DefaultRecordBatch._read_msg = reader
    try:
        return list(DefaultRecordBatch(data))
    finally:
        DefaultRecordBatch._read_msg = saved


def fields(record: Any) -> tuple[Any, ...]:
    return (record.offset, record.timestamp, record.key, record.value, record.headers, record.size_in_bytes)


def random_records(seed: int) -> Iterator[Fields]:
    rng = random.Random(seed)
    for _ in range(40):
        key = None if rng.random() < 0.2 else rng.randbytes(rng.randrange(0, 40))
        value = None if rng.random() < 0.1 else rng.randbytes(rng.randrange(0, 3000))
        headers: list[Header] = [
            (rng.choice(["id", "é-name", "", "x" * 300]), None if rng.random() < 0.2 else rng.randbytes(9))
            for _ in range(rng.randrange(0, 4))
        ]
        yield key, value, headers


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
def test_readable_records_come_out_as_kafka_python_reads_them(gzip: bool):
    for seed in range(5):
        data = batch_bytes(list(random_records(seed)), gzip=gzip)
        assert [fields(r) for r in read(data)] == [fields(r) for r in read(data, STOCK_READ_MSG)]


def test_a_header_name_that_is_not_utf8_is_marked_and_the_records_after_it_are_read():
    bad_header: list[Header] = [(NotUtf8("x"), b"v")]
    data = batch_bytes([(b"a", b"1", []), (b"bad", b"kept", bad_header), (b"c", b"3", [("h", b"x")])])
    with pytest.raises(CorruptRecordError):
        read(data, STOCK_READ_MSG)  # kafka-python raises, and its fetcher would raise on every poll
    first, bad, last = read(data)
    assert (first.offset, first.key, first.headers) == (0, b"a", [])
    assert (bad.offset, bad.key, bad.value) == (1, b"bad", b"kept"), "key and value kept for the dead letter"
    assert type(bad.headers) is UnreadableHeaders and list(bad.headers) == []
    assert "not UTF-8" in bad.headers.problem and "offset 1" in bad.headers.problem
    assert (last.offset, last.key, last.value, last.headers) == (2, b"c", b"3", [("h", b"x")])


def damaged(count_byte: bytes) -> bytes:
    """Three plain records; the middle one's header count replaced by ``count_byte`` (a zigzag varint)."""
    data = batch_bytes([(b"k", b"v", [("h", b"x")])] * 3)
    second = data.index(PLAIN_FIELDS, data.index(PLAIN_FIELDS) + 1)
    count_at = second + 4
    return data[:count_at] + count_byte + data[count_at + 1 :]


@pytest.mark.parametrize(
    ("count_byte", "problem"),
    [(b"\x01", "invalid number of headers -1"), (b"\x00", "its fields and its length differ by 4 bytes")],
    ids=["negative-header-count", "fields-short-of-its-length"],
)
def test_a_record_that_does_not_add_up_is_marked_and_reading_goes_on_at_the_next(count_byte, problem):
    data = damaged(count_byte)
    with pytest.raises(CorruptRecordError):
        read(data, STOCK_READ_MSG)
    records = read(data)
    assert [r.offset for r in records] == [0, 1, 2]
    assert records[0].headers == records[2].headers == [("h", b"x")]
    bad = records[1]
    assert (bad.key, bad.value) == (b"k", b"v") and problem in bad.headers.problem


def test_a_record_whose_value_cannot_be_read_keeps_its_raw_bytes_as_the_value():
    data = batch_bytes([(b"k", b"v", [("h", b"x")])])
    at = data.index(PLAIN_FIELDS)
    data = data[:at] + b"\x02k\x7e" + data[at + 3 :]  # the value says 63 bytes: more than the record holds
    [bad] = read(data)
    assert bad.key is None and PLAIN_FIELDS[:2] in bad.value and "runs past the record" in bad.headers.problem


def test_a_record_that_runs_past_its_batch_still_raises():
    data = batch_bytes([(b"k", b"v", [("h", b"x")])])
    length_at = DefaultRecordBatch.HEADER_STRUCT.size
    data = data[:length_at] + b"\x7e" + data[length_at + 1 :]  # 63 bytes long, in a 14-byte record
    with pytest.raises(CorruptRecordError, match="runs past its batch"):
        read(data)


class Polled:
    """A kafka-python consumer that returns ``records`` from poll."""

    def __init__(self, records: dict[TopicPartition, list[Any]]) -> None:
        self.records = records

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        return self.records


def test_the_adapter_hands_a_marked_record_over_as_unreadable_and_leaves_other_polls_alone():
    tp = TopicPartition("images", 0)
    readable, bad = read(batch_bytes([(b"a", b"1", []), (b"b", b"2", [(NotUtf8("x"), b"v")])]))
    as_polled = [_consumer_record(tp, r) for r in (readable, bad)]
    [kept, unreadable] = ConsumerAdapter(Polled({tp: as_polled})).poll(0, 10)[tp]
    assert kept is as_polled[0]
    assert unreadable == UnreadableRecord("images", 0, 1, 1001, b"b", b"2", bad.headers.problem)
    plain = [as_polled[0]]
    assert ConsumerAdapter(Polled({tp: plain})).poll(0, 10)[tp] is plain


def _consumer_record(tp: TopicPartition, record: Any) -> Any:
    from kafka.consumer.fetcher import ConsumerRecord

    return ConsumerRecord(
        tp.topic, tp.partition, 0, record.offset, record.timestamp, 0, record.key, record.value,
        record.headers, None, -1, -1, -1,
    )  # fmt: skip
