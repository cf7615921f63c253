"""The patched receive path parses every byte stream exactly as kafka-python's own does."""

from __future__ import annotations

import random
import socket
import types
from typing import Any

import kafka.errors as client_errors
import pytest
from kafka.net.transport import KafkaTCPTransport
from kafka.protocol.consumer.fetch import FetchRequest, FetchResponse
from kafka.protocol.frame import KafkaBytes
from kafka.protocol.parser import KafkaProtocol
from kafka.record.default_records import DefaultRecordBatch
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder
from kafka.version import __version__ as client_version

from worker.config import load_settings
from worker.kafka_io import factories, receive_path, record_parser
from worker.kafka_io.receive_path import PATCHED_VERSION, STOCK_RECEIVE_BYTES, STOCK_SOCK_RECV, FrameBuffer

TOPIC = FetchResponse.FetchableTopicResponse


def record_set(count: int, size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    builder = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 30)
    for index in range(count):
        value = None if index == 1 else rng.randbytes(rng.randrange(0, size))
        key = None if index == 2 else f"k{index}".encode()
        builder.append(timestamp=1000 + index, key=key, value=value, headers=[("h", b"x"), ("n", None)])
    builder.close()
    return bytes(builder.buffer())


def fetch_response(version: int, seed: int) -> FetchResponse:
    partitions = [
        TOPIC.PartitionData(
            partition_index=index,
            error_code=0,
            high_watermark=100,
            last_stable_offset=100,
            log_start_offset=0,
            records=record_set(count, 90_000, seed + index) if count else None,
        )
        for index, count in enumerate((5, 0, 3))
    ]
    return FetchResponse(
        throttle_time_ms=0,
        error_code=0,
        session_id=0,
        responses=[TOPIC(topic="images", partitions=partitions)],
        version=version,
    )


def conversation(versions: list[int]) -> tuple[bytes, KafkaProtocol, KafkaProtocol]:
    """The frames of a broker's answers to a client's fetches, and two clients that sent them."""
    frames = b""
    clients = KafkaProtocol(client_id="t"), KafkaProtocol(client_id="t")
    for seed, version in enumerate(versions):
        request = FetchRequest(replica_id=-1, max_wait_ms=100, min_bytes=1, topics=[], version=version)
        for client in clients:
            correlation_id = client.send_request(request)
        response = fetch_response(version, seed * 10)
        response.with_header(correlation_id=correlation_id)
        frames += bytes(response.encode(framed=True, header=True))
    return frames, *clients


def cut(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` as a socket may deliver it: pieces from one byte to a few hundred KB."""
    pieces, i = [], 0
    while i < len(data):
        size = rng.choice((1, 2, 3, 4, 5, 7, 4096, rng.randrange(1, 300_000)))
        pieces.append(data[i : i + size])
        i += size
    return pieces


def parsed(responses: list[tuple[int, Any]]) -> list[Any]:
    """What the consumer takes from the responses: every field, and every record of every partition."""
    out = []
    for correlation_id, response in responses:
        records = []
        for topic in response.responses:
            for partition in topic.partitions:
                batch = partition.records
                assert batch is None or type(batch) is bytes
                for record_batch in MemoryRecords(batch) if batch else ():
                    for record in record_batch:
                        records.append(
                            (record.offset, record.timestamp, record.key, record.value, record.headers)
                        )
        out.append((correlation_id, response.to_dict(), records))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_responses_cut_anywhere_parse_as_kafka_python_parses_them(seed: int):
    frames, stock, patched = conversation([4, 12, 12, 16, 4])
    rng = random.Random(seed)
    expected, got = [], []
    for piece in cut(frames, rng):
        expected += STOCK_RECEIVE_BYTES(stock, piece)
        got += receive_path.receive_bytes(patched, piece)
    assert len(got) == 5
    assert parsed(got) == parsed(expected)
    assert [response for _, response in got] == [response for _, response in expected]


def test_a_whole_conversation_in_one_piece_and_byte_by_byte():
    frames, stock, patched = conversation([12, 12])
    expected = STOCK_RECEIVE_BYTES(stock, frames)
    assert parsed(receive_path.receive_bytes(patched, frames)) == parsed(expected)
    frames, stock, patched = conversation([4])
    small = frames[:4] + frames[4:300]  # the frame header then a part of the frame, a byte at a time
    got = [r for i in range(len(small)) for r in receive_path.receive_bytes(patched, small[i : i + 1])]
    got += receive_path.receive_bytes(patched, frames[len(small) :])
    assert parsed(got) == parsed(STOCK_RECEIVE_BYTES(stock, frames))


def test_bad_frames_are_refused_as_kafka_python_refuses_them():
    for data, error in (
        (b"\xff\xff\xff\xff", client_errors.InvalidReceiveError),  # a negative frame length
        (b"\x00\x00\x00\x08\x00\x00\x00\x07\x00\x00\x00\x00", client_errors.CorrelationIdError),
    ):
        _frames, stock, patched = conversation([12])
        with pytest.raises(error):
            STOCK_RECEIVE_BYTES(stock, data)
        with pytest.raises(error):
            receive_path.receive_bytes(patched, data)


def test_the_frame_buffer_reads_as_kafka_bytes_reads():
    rng = random.Random(3)
    data = rng.randbytes(500)
    stock = KafkaBytes(len(data))
    stock.write(data)
    stock.seek(0)
    frame = FrameBuffer(data)
    for _ in range(2000):
        action = rng.random()
        if action < 0.1:
            position = rng.randrange(0, 600)
            stock.seek(position)
            frame.seek(position)
        else:
            size = None if action < 0.2 else rng.randrange(0, 60)
            assert frame.read(size) == stock.read(size)
        assert frame.tell() == stock.tell()
    assert len(frame) == len(stock)


def socket_pair() -> tuple[socket.socket, socket.socket]:
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    return reader, writer


def test_the_socket_is_read_as_kafka_python_reads_it():
    data = random.Random(5).randbytes(150_000)
    for read in (STOCK_SOCK_RECV, receive_path.sock_recv):
        reader, writer = socket_pair()
        writer.sendall(data)
        transport = types.SimpleNamespace(_sock=reader)
        received, error = read(transport)
        while len(received) < len(data) and error is None:  # the kernel may hand it over in parts
            more, error = read(transport)
            received += more
        assert (received, error) == (data, None)
        assert read(transport) == (b"", None), "nothing more to read: the loop stops, no error"
        writer.close()
        received, error = read(transport)
        assert received == b"" and isinstance(error, client_errors.KafkaConnectionError)
        reader.close()


@pytest.fixture
def stock_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """kafka-python's own methods, put back after the test whatever it installs."""
    monkeypatch.setattr(KafkaTCPTransport, "_sock_recv", STOCK_SOCK_RECV)
    monkeypatch.setattr(KafkaProtocol, "receive_bytes", STOCK_RECEIVE_BYTES)
    monkeypatch.setattr(DefaultRecordBatch, "_read_msg", record_parser.STOCK_READ_MSG)


@pytest.mark.usefixtures("stock_client")
def test_another_kafka_python_version_keeps_its_own_receive_path(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(receive_path, "client_version", "3.0.13")
    assert not receive_path.install()
    assert KafkaProtocol.receive_bytes is STOCK_RECEIVE_BYTES
    assert KafkaTCPTransport._sock_recv is STOCK_SOCK_RECV
    assert DefaultRecordBatch._read_msg is record_parser.STOCK_READ_MSG
    assert not receive_path.installed()


@pytest.mark.usefixtures("stock_client")
def test_the_clients_are_made_with_the_patched_receive_path(monkeypatch: pytest.MonkeyPatch):
    made: list[str] = []
    monkeypatch.setattr(factories, "KafkaConsumer", lambda **options: made.append("consumer"))
    monkeypatch.setattr(factories, "KafkaProducer", lambda **options: made.append("producer"))
    settings = load_settings({"device": "cpu", "connect_timeout_s": 1}, environ={})
    assert not receive_path.installed()
    factories.make_consumer(settings)
    assert receive_path.installed()
    factories.make_producer(settings)
    assert made == ["consumer", "producer"]


def test_the_installed_kafka_python_is_the_version_the_receive_path_replaces():
    # pyproject pins it; an upgrade must come with the receive path read again against the new version.
    assert client_version == PATCHED_VERSION, (
        f"kafka-python {client_version} is installed; receive_path.py replaces methods of {PATCHED_VERSION}"
    )
