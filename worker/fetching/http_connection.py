"""One HTTP/1.1 connection on the fetch loop: a GET written, its answer read by llhttp within a byte limit.

The answer is parsed by httptools (llhttp, Node.js's parser, in C): framing (Content-Length, chunked
encoding, both at once refused as smuggling), header syntax and keep-alive are its decisions. This module
only keeps what the fetcher needs of the answer: its status, two headers and, for a 2xx, its body.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httptools

_KEPT_HEADERS = frozenset({b"location", b"retry-after"})
# The most bytes an answer's status line and headers may take (aiohttp allowed 8 KiB per field). llhttp sets
# no limit, and httptools grows a header split over many reads by concatenation: a server sending megabytes
# of one header would hold the fetch loop, and every other fetch with it.
MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Response:
    """An answer: its status, its ``Location`` and ``Retry-After`` headers, and (2xx only) its body."""

    status: int
    location: str | None = None
    retry_after: str | None = None
    body: bytes = b""


class ConnectionBroke(Exception):
    """The connection ended before the whole answer; ``before_answer`` when not one byte of it came (a
    kept-alive connection the server had closed meanwhile: worth one more try on a fresh connection)."""

    def __init__(self, reason: str, before_answer: bool) -> None:
        super().__init__(reason)
        self.before_answer = before_answer


class MalformedAnswer(Exception):
    """The server's answer is not valid HTTP/1.1."""


class BodyTooLarge(Exception):
    """A 2xx body over the byte limit; ``declared`` is its Content-Length when that alone was too large
    (nothing of the body was read then)."""

    def __init__(self, declared: int | None) -> None:
        super().__init__(declared)
        self.declared = declared


class HttpConnection(asyncio.Protocol):
    """A connection that answers one :meth:`request` at a time (no pipelining).

    The parser's callbacks only record what they see; :meth:`data_received` decides, after each chunk,
    whether the answer is complete, failed or needs more. An answer other than 2xx ends at its headers
    (its body is never read: the connection is reused only if the body had already arrived whole).
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._lost = False
        self.requests = 0  # sent on this connection so far: one before this means it was kept alive
        self._reset(0)

    def _reset(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._status = 0
        self._headers: dict[bytes, bytes] = {}
        self._headers_done = False
        self._complete = False
        self._keep_alive = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._failure: Exception | None = None
        self._head_bytes = 0  # received before the headers were complete (none: nothing of the answer)
        self._trailing = False  # another answer began after this one: the server cannot be trusted

    @property
    def reusable(self) -> bool:
        """Whether the last request's answer arrived whole, allowing another, on a connection still open."""
        transport = self._transport
        open_ = transport is not None and not transport.is_closing() and not self._lost
        return open_ and self._complete and self._keep_alive

    def request(self, head: bytes, max_bytes: int) -> asyncio.Future[Response]:
        """Send a request ``head`` (a GET has nothing more) and return the future of its answer; a 2xx
        body over ``max_bytes`` fails it with :class:`BodyTooLarge`."""
        if self._transport is None or self._waiter is not None:
            raise RuntimeError("a request on a connection not open or still answering another")
        self._reset(max_bytes)
        self.requests += 1
        waiter = asyncio.get_running_loop().create_future()
        if self._lost:
            waiter.set_exception(ConnectionBroke("the connection was closed", before_answer=True))
        else:
            self._waiter = waiter
            self._transport.write(head)
        return waiter

    def close(self) -> None:
        """Close the connection (an answer still awaited fails)."""
        if self._transport is not None:
            self._transport.close()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # nothing was asked: a server talking out of turn
            self.close()
            return
        if not self._headers_done:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:  # 101: we asked for none
            if not self._complete:
                self._fail(MalformedAnswer(_parser_error(exc)))
                return
            self._keep_alive = False  # bytes after a whole answer: deliver it, reuse nothing
        if self._trailing:
            self._keep_alive = False
        if not self._headers_done and self._head_bytes > MAX_HEAD_BYTES:
            self._fail(MalformedAnswer(f"headers over {MAX_HEAD_BYTES} bytes"))
        elif self._failure is not None:
            self._fail(self._failure)
        elif self._complete:
            self._answer(self._response())
        elif self._headers_done and not _is_success(self._status):
            self.close()  # its body is not wanted and not read: the connection cannot be reused
            self._answer(self._response())

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._waiter is None:
            return
        if exc is None and self._until_close():  # a body ended by the connection's end (not a reset)
            self._answer(self._response())
            return
        reason = "the connection was closed" if exc is None else type(exc).__name__
        self._answer(ConnectionBroke(reason, before_answer=self._head_bytes == 0))

    # httptools callbacks: once the answer is complete, whatever follows is ignored (and the connection
    # not reused), never read as part of it

    def on_message_begin(self) -> None:
        if self._complete:
            self._trailing = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._complete:
            return
        name = name.lower()
        if name in _KEPT_HEADERS or name in (b"content-length", b"transfer-encoding"):
            self._headers[name] = value

    def on_headers_complete(self) -> None:
        if self._complete:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer, the real one follows
            self._headers = {}
            return
        if status < 100:
            self._failure = MalformedAnswer(f"status {status}")
            return
        self._status = status
        self._headers_done = True
        declared = self._headers.get(b"content-length")
        if _is_success(status) and declared is not None and int(declared) > self._max_bytes:
            self._failure = BodyTooLarge(int(declared))  # llhttp admits digits only

    def on_body(self, body: bytes) -> None:
        if self._complete or self._failure is not None or not _is_success(self._status):
            return
        self._size += len(body)
        if self._size > self._max_bytes:
            self._failure = BodyTooLarge(None)
            self._chunks = []
        else:
            self._chunks.append(body)

    def on_message_complete(self) -> None:
        if self._headers_done and not self._complete:  # not the end of a 1xx, nor of a second answer
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()

    # helpers

    def _fail(self, failure: Exception) -> None:
        self.close()
        self._answer(failure)

    def _answer(self, outcome: Response | Exception) -> None:
        """Resolve the request's future and let go of it: an idle connection must not keep the last
        body alive (128 idle connections held 640 MB of 5 MB images that way)."""
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():  # cancelled: the fetch timed out or the worker stops
            return
        if isinstance(outcome, Exception):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)

    def _until_close(self) -> bool:
        """A 2xx answer with neither a length nor chunks, whose body ends with the connection."""
        return (
            self._headers_done
            and self._failure is None
            and _is_success(self._status)
            and b"content-length" not in self._headers
            and b"chunked" not in self._headers.get(b"transfer-encoding", b"").lower()
        )

    def _response(self) -> Response:
        body = b""
        if _is_success(self._status):
            body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        location = self._headers.get(b"location")
        retry_after = self._headers.get(b"retry-after")
        return Response(
            self._status,
            location.decode("latin-1").strip() if location else None,
            retry_after.decode("latin-1").strip() if retry_after else None,
            body,
        )


def _is_success(status: int) -> bool:
    return 200 <= status < 300


def _parser_error(exc: httptools.HttpParserError | httptools.HttpParserUpgrade) -> str:
    if isinstance(exc, httptools.HttpParserUpgrade):
        return "the server switched protocols unasked"
    # llhttp's messages name the fault ("Invalid header token"), never the request: safe to show.
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
