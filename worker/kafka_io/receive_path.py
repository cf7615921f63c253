"""kafka-python's receive path with fewer copies of each fetched byte and a record parser that does not
raise, for kafka-python 3.0.12 only.

Every byte the consumer fetches is copied, with the GIL held, five to six times by kafka-python 3.0.12
before record parsing even starts: ``recv(4096)`` chunks joined, the joined bytes sliced again per frame,
written into a zero-filled ``bytearray`` the size of the whole response, and read back with
``bytes(self[start:end])`` (two copies). At 80 KB per image that is most of the consumer's I/O thread
time. :func:`install` replaces three methods:

- ``KafkaTCPTransport._sock_recv`` reads up to 256 KiB per ``recv`` instead of 4 KiB (the same loop
  otherwise: read until the socket would block, join, report a disconnect or an error the same way);
- ``KafkaProtocol.receive_bytes`` keeps the frame's pieces as views of the received bytes and joins them
  once when the frame is complete, into a :class:`FrameBuffer` that offers the decoders what kafka-python's
  ``KafkaBytes`` offers them (``read``, ``seek``, ``tell``) and returns the same ``bytes`` from ``read``
  with one copy instead of two, and without the zero-filled buffer;
- ``DefaultRecordBatch._read_msg`` by :func:`worker.kafka_io.record_parser.read_record`, which hands over a
  record it cannot decode marked as such instead of raising on every poll.

The responses decoded are the same objects of the same types; tests/unit/test_kafka_receive_path.py
feeds the same byte streams, cut at random, through the stock and the patched parser and compares them.
Any other kafka-python version is left as it is: the replaced methods are copies of 3.0.12's with the
copies taken out, and another version's may differ. TLS connections keep their own ``_sock_recv`` (one
TLS record per read anyway).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import kafka.errors as client_errors
from kafka.net.transport import KafkaTCPTransport
from kafka.protocol.parser import KafkaProtocol
from kafka.protocol.schemas.fields.codecs import Int32
from kafka.version import __version__ as client_version

from worker.kafka_io import record_parser

log = logging.getLogger(__name__)
PATCHED_VERSION = "3.0.12"
RECV_BYTES = 256 * 1024
_client_log = logging.getLogger("kafka.protocol.parser")
_transport_log = logging.getLogger("kafka.net.transport")

STOCK_SOCK_RECV = KafkaTCPTransport._sock_recv
STOCK_RECEIVE_BYTES = KafkaProtocol.receive_bytes


class FrameBuffer:
    """A received response frame, read as kafka-python's ``KafkaBytes`` is: ``read``, ``seek``, ``tell``."""

    __slots__ = ("_data", "_idx")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._idx = 0

    def read(self, nbytes: int | None = None) -> bytes:
        """The next ``nbytes`` (all that is left when None, fewer at the end), as ``KafkaBytes.read``."""
        size = len(self._data)
        start = self._idx
        end = size if nbytes is None else min(start + nbytes, size)
        self._idx = end
        return self._data[start:end]

    def seek(self, idx: int) -> None:
        """Move the read position to ``idx``."""
        self._idx = idx

    def tell(self) -> int:
        """The read position."""
        return self._idx

    def __len__(self) -> int:
        return len(self._data)


class _PartialFrame:
    """The pieces of a frame received so far (views of the received bytes: no copy until it is whole)."""

    __slots__ = ("missing", "pieces")

    def __init__(self, size: int) -> None:
        self.missing = size
        self.pieces: list[memoryview] = []

    def whole(self) -> FrameBuffer:
        return FrameBuffer(b"".join(self.pieces))


def receive_bytes(self: Any, data: bytes) -> list[Any]:
    """``KafkaProtocol.receive_bytes`` of kafka-python 3.0.12 without its copies (see the module)."""
    i = 0
    n = len(data)
    responses = []
    if data:
        _client_log.debug("%s Recv: %r", self._ident, data)
    # The pieces are views of ``data`` until the frame is whole: it must not change under them.
    view = memoryview(data if type(data) is bytes else bytes(data))
    while i < n:
        # Not receiving is the state of reading the payload header
        if not self._receiving:
            bytes_to_read = min(4 - self._header.tell(), n - i)
            self._header.write(view[i : i + bytes_to_read])
            i += bytes_to_read

            if self._header.tell() == 4:
                self._header.seek(0)
                nbytes = Int32.decode(self._header)
                self._validate_frame_size(nbytes)
                self._rbuffer = _PartialFrame(nbytes)
                self._receiving = True
            elif self._header.tell() > 4:
                raise client_errors.KafkaError("this should not happen - are you threading?")

        if self._receiving:
            frame: _PartialFrame = self._rbuffer
            bytes_to_read = min(frame.missing, n - i)
            if bytes_to_read:
                frame.pieces.append(view[i : i + bytes_to_read])
                frame.missing -= bytes_to_read
                i += bytes_to_read
            if frame.missing:
                break

            self._receiving = False
            responses.append(self._process_response(frame.whole()))
            self._reset_buffer()
    return responses


def sock_recv(self: Any) -> tuple[bytes, Exception | None]:
    """``KafkaTCPTransport._sock_recv`` of kafka-python 3.0.12 reading :data:`RECV_BYTES` at a time."""
    recvd = []
    err = None
    while True:
        try:
            data = self._sock.recv(RECV_BYTES)
            # An empty read without an exception: the peer closed the connection.
            if not data:
                _transport_log.error("%s: socket disconnected", self)
                err = client_errors.KafkaConnectionError("socket disconnected")
                break
            recvd.append(data)
        except (BlockingIOError, InterruptedError):
            break
        except BaseException as e:
            _transport_log.exception("%s: Error receiving network data closing socket", self)
            err = client_errors.KafkaConnectionError(e)
            break
    return b"".join(recvd), err


@functools.cache
def _say_once(message: str, *args: object) -> None:
    log.info(message, *args)


def install() -> bool:
    """Patch kafka-python's receive path (once; idempotent). False, with nothing changed, on any version
    but :data:`PATCHED_VERSION`."""
    if client_version != PATCHED_VERSION:
        # Said (once per process) so that an upgrade that loses the saving does not lose it silently.
        _say_once(
            "kafka-python %s: its receive path runs unpatched (the copy-saving patch is for %s)",
            client_version,
            PATCHED_VERSION,
        )
        return False
    KafkaTCPTransport._sock_recv = sock_recv
    KafkaProtocol.receive_bytes = receive_bytes
    record_parser.install()
    return True


def installed() -> bool:
    """Whether the patched receive path is in place."""
    return (
        KafkaProtocol.receive_bytes is receive_bytes
        and KafkaTCPTransport._sock_recv is sock_recv
        and record_parser.installed()
    )
