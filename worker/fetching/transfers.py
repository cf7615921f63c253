"""HTTP(S) transfers by libcurl (through pycurl), driven from the fetch loop by pycurl's own asyncio
integration (``pycurl.AsyncCurlMulti``).

libcurl does the protocol: framing, TLS, keep-alive and its connection cache, and the checks a long-lived
client needs (a server that sends more than it announced loses its connection; heads have a ceiling). One
more check is ours: libcurl looks for unread bytes on an idle connection only once it has been idle for a
second, so a connection about to carry a request is looked at here first, and one that has something to
read (an unasked answer, the server's close) is shut and the request goes on a new connection. This module
turns each finished transfer into an :class:`Answer` or a :class:`TransferFailed`.

What travels is decided here once for every transfer: HTTP/1.1 (one request per connection at a time,
which the check above relies on), no proxy (environment variables included), no redirects followed by
libcurl (the caller checks each hop), no decoding of compressed bodies, HTTP and HTTPS only, the host name
pinned to the addresses the caller checked (``CURLOPT_RESOLVE``) and every socket refused unless the
caller's guard passes its address (``CURLOPT_OPENSOCKETFUNCTION``).
"""

from __future__ import annotations

import io
import os
import select
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pycurl

# The most bytes an answer's status line and headers may take: an image server needs a few hundred. Counted
# as the head arrives, however it is split across reads.
MAX_HEAD_BYTES = 64 * 1024
# Bytes libcurl reads and hands over at once: fewer writes per large body than its 16 KiB default.
_BUFFER_BYTES = 1024 * 1024
# An idle connection older than this is not reused (servers close theirs after 5 to 60 s).
_KEEPALIVE_S = 30
# libcurl 8.4 is the first to stop a body at CURLOPT_MAXFILESIZE_LARGE as it streams in, not only by its
# declared length: the byte limit relies on it.
_LIBCURL_NEEDED = 0x080400
# libcurl's codes that pycurl names under older spellings or not at all.
E_WEIRD_SERVER_REPLY = 8
E_TOO_LARGE = 100
# Our own code for a transfer that could not run at all (the fetch loop is closing).
E_NOT_RUN = -1


@dataclass
class Answer:
    """A final answer: its status, its ``Location`` and ``Retry-After`` headers, and (2xx only) its
    body."""

    status: int
    location: str | None = None
    retry_after: str | None = None
    body: bytes = b""


class TransferFailed(Exception):
    """A transfer that brought no answer: libcurl's error ``code`` and message, the ``status`` and
    ``declared`` body length of the answer it had begun to read (0 and None when unknown), and what this
    module itself stopped (``head_too_large``: the head passed :data:`MAX_HEAD_BYTES`; ``stale``: the
    kept-alive connection had bytes nobody asked for). A body over the byte limit is libcurl's
    ``E_FILESIZE_EXCEEDED``, by its declared length or as it streams in."""

    def __init__(
        self,
        code: int,
        message: str,
        status: int = 0,
        declared: int | None = None,
        head_too_large: bool = False,
        stale: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.declared = declared
        self.head_too_large = head_too_large
        self.stale = stale


Connection = tuple[str, int, str, int]
"""Local IP and port, remote IP and port."""


@dataclass(frozen=True)
class Request:
    """One GET: ``url`` (no userinfo), extra ``headers``, the addresses its host was checked to have
    (``pinned``: ``+host:port:address,...`` for CURLOPT_RESOLVE, or None for a host written as an
    address), and ``permits``: whether a connection may go to an address (the SSRF guard's verdict for
    this host)."""

    url: str
    headers: list[str]
    permits: Callable[[str], bool]
    pinned: str | None = None
    max_bytes: int = 0
    timeout_s: float = 10.0


class _Transfer:
    """One libcurl easy handle, and what its callbacks gather while it runs a transfer: the handle and
    its callbacks are made once and serve transfer after transfer (:meth:`start` begins the next)."""

    def __init__(self, sockets: _KeptSockets, constant: list[tuple[int, Any]]) -> None:
        self.sockets = sockets
        self.curl = pycurl.Curl()
        for option, value in constant:
            self.curl.setopt(option, value)
        self.curl.setopt(pycurl.HEADERFUNCTION, self.on_header)
        self.curl.setopt(pycurl.OPENSOCKETFUNCTION, self.open_socket)
        self.curl.setopt(pycurl.SOCKOPTFUNCTION, self.on_new_socket)
        self.curl.setopt(pycurl.PREREQFUNCTION, self.before_request)
        self._set: dict[int, Any] = {}  # the per-request options as the handle has them now
        self.request = Request("", [], _refuse)
        self.body = io.BytesIO()
        self.head_bytes = 0
        self.location: str | None = None
        self.retry_after: str | None = None
        self.head_too_large = self.stale = False
        self.new_socket: int | None = None  # the socket of a connection opened for this transfer

    def start(self, request: Request, fresh: bool) -> None:
        """Ready the handle for ``request`` (on a new connection if ``fresh``)."""
        self.request = request
        # The body goes straight into a buffer whose bytes the answer then takes over, uncopied.
        self.body = io.BytesIO()
        self.curl.setopt(pycurl.WRITEFUNCTION, self.body.write)
        self.head_bytes = 0
        self.location = self.retry_after = None
        self.head_too_large = self.stale = False
        self.new_socket = None
        self.curl.setopt(pycurl.URL, request.url)
        # libcurl loads pinned addresses into its cache when a transfer starts, so they are set every
        # time; "+" lets the entry expire with libcurl's cache instead of staying for good.
        self.curl.setopt(pycurl.RESOLVE, [request.pinned] if request.pinned else [])
        for option, value in (
            (pycurl.HTTPHEADER, request.headers),
            (pycurl.MAXFILESIZE_LARGE, request.max_bytes),
            (pycurl.TIMEOUT_MS, max(1, int(request.timeout_s * 1000))),
            (pycurl.FRESH_CONNECT, int(fresh)),
        ):
            if self._set.get(option) != value:  # most requests repeat the last one's options
                self.curl.setopt(option, value)
                self._set[option] = value

    def on_header(self, line: bytes) -> int | None:
        self.head_bytes += len(line)
        if self.head_bytes > MAX_HEAD_BYTES:
            self.head_too_large = True
            return 0
        if line[:5] == b"HTTP/":  # a new answer (an interim 1xx comes first): its own head
            self.location = self.retry_after = None
        elif line[:1] in b"LlRr":
            name, sep, value = line.partition(b":")
            if sep:
                lowered = name.lower()
                if lowered == b"location":
                    self.location = value.strip().decode("latin-1")
                elif lowered == b"retry-after":
                    self.retry_after = value.strip().decode("latin-1")
        return None

    def open_socket(self, purpose: int, address: Any) -> socket.socket | int:
        # A second line of defence behind the pinned resolution: no connection to an address the guard
        # does not pass for this host, whatever libcurl was told.
        family, socktype, protocol, target = address
        try:
            permitted = self.request.permits(str(target[0]))
        except Exception:  # a callback must not raise into libcurl
            permitted = False
        if not permitted:
            return pycurl.SOCKET_BAD
        return socket.socket(family, socktype, protocol)

    def on_new_socket(self, fd: int, purpose: int) -> int:
        self.new_socket = fd
        return pycurl.SOCKOPT_OK

    def before_request(self, remote_ip: str, local_ip: str, remote_port: int, local_port: int) -> int:
        """Called once the connection is ready and before the request goes: a kept-alive connection
        with something to read is not asked anything (whatever it holds would be read as the answer)."""
        connection = (local_ip, local_port, remote_ip, remote_port)
        if self.new_socket is not None:  # a connection just opened: nothing unasked can be on it yet
            self.sockets.remember(connection, self.new_socket)
            return pycurl.PREREQFUNC_OK
        try:
            self.stale = self.sockets.has_unread_bytes(connection)
        except Exception:  # a callback must not raise into libcurl; its own check stays
            self.stale = False
        return pycurl.PREREQFUNC_ABORT if self.stale else pycurl.PREREQFUNC_OK


def _refuse(_address: str) -> bool:
    return False


class _KeptSockets:
    """The socket of each connection libcurl opened, by its addresses (local and remote IP and port:
    what tells one TCP connection from every other open one). libcurl does not hand a connection's socket
    to the callback that runs before a request; this is where that callback finds it. A live connection's
    entry is always its own socket (a later connection with the same addresses replaces it); entries of
    closed connections, whose socket numbers may since serve another, are dropped when there are many."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._by_connection: dict[Connection, int] = {}

    def remember(self, connection: Connection, fd: int) -> None:
        """Note the socket of a connection libcurl has just opened."""
        self._by_connection[connection] = fd
        if len(self._by_connection) > self._limit:
            self._by_connection = {c: s for c, s in self._by_connection.items() if _is_connection(s, c)}
            self._limit = max(self._limit, 2 * len(self._by_connection))

    def has_unread_bytes(self, connection: Connection) -> bool:
        """Whether the kept-alive ``connection`` has something to read (bytes or its end); if so it is
        shut, so that libcurl never reuses it."""
        fd = self._by_connection.get(connection)
        if fd is None:
            return False
        # A live connection's entry is its own socket: one opened later with the same addresses would have
        # replaced it, and pruning keeps the entries whose socket still has them.
        watch = select.poll()
        watch.register(fd, select.POLLIN)
        if not watch.poll(0):
            return False  # nothing there: the one answer it will carry is the next one
        del self._by_connection[connection]
        family = socket.AF_INET6 if ":" in connection[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd) as view:
            try:
                view.shutdown(socket.SHUT_RDWR)  # never reused again: libcurl sees it closed
            finally:
                view.detach()  # the socket is libcurl's: shut it, never close it
        return True


def _is_connection(fd: int, connection: Connection) -> bool:
    """Whether socket ``fd`` is still the one of ``connection`` (same local and remote address)."""
    try:
        with socket.socket(fileno=fd) as view:
            try:
                local, remote = view.getsockname(), view.getpeername()
            finally:
                view.detach()  # the socket is libcurl's: look, never close
    except OSError:
        return False
    return (str(local[0]), int(local[1]), str(remote[0]), int(remote[1])) == connection


class Transfers:
    """Runs GETs on one libcurl multi handle from the running asyncio loop; at most ``connections`` open
    at once (more transfers wait inside libcurl for one to free). Use from that loop's thread only."""

    def __init__(self, connections: int) -> None:
        if pycurl.version_info()[2] < _LIBCURL_NEEDED:
            raise RuntimeError(f"images by reference need libcurl 8.4 or newer; pycurl has {pycurl.version}")
        self._multi = pycurl.AsyncCurlMulti()
        self._multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, connections)
        self._multi.setopt(pycurl.M_MAXCONNECTS, connections)
        self._idle: list[_Transfer] = []
        # Every connection that may be reused: the cache's and those in use, with room to spare.
        self._sockets = _KeptSockets(4 * connections)
        self._constant = _constant_options()

    async def get(self, request: Request) -> Answer:
        """The final answer to ``request``. Raises :class:`TransferFailed`."""
        try:
            return await self._run(request, fresh=False)
        except TransferFailed as failure:
            if not failure.stale:
                raise
        return await self._run(request, fresh=True)  # asked nothing yet: not a retry, no backoff

    async def _run(self, request: Request, fresh: bool) -> Answer:
        transfer = self._idle.pop() if self._idle else _Transfer(self._sockets, self._constant)
        transfer.start(request, fresh)
        curl = transfer.curl
        try:
            await self._multi.perform(curl)
            status = int(curl.getinfo(pycurl.RESPONSE_CODE))
            body = transfer.body.getvalue() if 200 <= status < 300 else b""
        except pycurl.error as exc:
            code, message = exc.args if len(exc.args) == 2 else (E_NOT_RUN, str(exc))
            self._idle.append(transfer)
            raise _failure(transfer, int(code), str(message)) from None
        except RuntimeError as exc:  # the multi handle is closed: the fetch loop is stopping
            raise TransferFailed(E_NOT_RUN, str(exc)) from None
        finally:
            transfer.body.close()  # an idle handle keeps nothing it delivered
        # A cancelled transfer is the multi handle's to remove, and is not used again.
        self._idle.append(transfer)
        return Answer(status, transfer.location, transfer.retry_after, body)

    async def close(self) -> None:
        """Stop every transfer and close every connection."""
        await self._multi.aclose()
        for transfer in self._idle:
            transfer.curl.close()
        self._idle.clear()


def _failure(transfer: _Transfer, code: int, message: str) -> TransferFailed:
    """What a transfer that brought no answer tells, with what its answer had begun to say."""
    curl = transfer.curl
    length = int(curl.getinfo(pycurl.CONTENT_LENGTH_DOWNLOAD_T))
    return TransferFailed(
        code,
        message,
        int(curl.getinfo(pycurl.RESPONSE_CODE)),
        length if length >= 0 else None,
        transfer.head_too_large,
        transfer.stale,
    )


def _constant_options() -> list[tuple[int, Any]]:
    """The options every transfer has. CA certificates are Python's own defaults (so ``SSL_CERT_FILE``
    and ``SSL_CERT_DIR`` work as they do for every other client here), not the path compiled into the
    libcurl that pycurl's wheel carries, which need not exist on this system."""
    options: list[tuple[int, Any]] = [
        (pycurl.NOSIGNAL, 1),
        (pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1),
        (pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS),
        (pycurl.FOLLOWLOCATION, 0),
        (pycurl.PROXY, ""),  # empty: no proxy, whatever http_proxy and friends say
        (pycurl.HTTP_CONTENT_DECODING, 0),
        (pycurl.PATH_AS_IS, 1),  # the target as the reference wrote it
        (pycurl.BUFFERSIZE, _BUFFER_BYTES),
        (pycurl.MAXAGE_CONN, _KEEPALIVE_S),
        (pycurl.SSL_VERIFYPEER, 1),
        (pycurl.SSL_VERIFYHOST, 2),
    ]
    paths = ssl.get_default_verify_paths()
    if paths.cafile and os.path.isfile(paths.cafile):
        options.append((pycurl.CAINFO, paths.cafile))
    if paths.capath and os.path.isdir(paths.capath):
        options.append((pycurl.CAPATH, paths.capath))
    return options
