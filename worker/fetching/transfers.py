"""HTTP(S) transfers by libcurl (through pycurl), driven from the fetch loop.

libcurl's multi interface does the protocol: framing, TLS, keep-alive and its connection cache, and the
checks a long-lived client needs (a kept-alive connection with unread bytes on it is dead, never read
into the next request; a server that sends more than it announced loses its connection; heads have a
ceiling). One more check is ours: libcurl looks for unread bytes on an idle connection only once it has
been idle for a second, so a connection about to carry a request is looked at here first, and one that
has something to read (an unasked answer, the server's close) is shut and the request goes on a new
connection. Otherwise this module only connects libcurl's sockets and timers to the asyncio loop, as its
``multi_socket`` API is meant to be used, and turns each finished transfer into an :class:`Answer` or a
:class:`TransferFailed`.

What travels is decided here once for every transfer: no proxy (environment variables included), no
redirects followed by libcurl (the caller checks each hop), no decoding of compressed bodies, HTTP and
HTTPS only, the host name pinned to the addresses the caller checked (``CURLOPT_RESOLVE``) and every
socket refused unless it goes to one of them (``CURLOPT_OPENSOCKETFUNCTION``).
"""

from __future__ import annotations

import asyncio
import io
import os
import select
import socket
import ssl
from collections import OrderedDict
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
_CSELECT = {
    pycurl.POLL_IN: pycurl.CSELECT_IN,
    pycurl.POLL_OUT: pycurl.CSELECT_OUT,
    pycurl.POLL_INOUT: pycurl.CSELECT_IN | pycurl.CSELECT_OUT,
}
# libcurl 8.4 is the first to stop a body at CURLOPT_MAXFILESIZE_LARGE as it streams in, not only by its
# declared length: the byte limit relies on it.
_LIBCURL_NEEDED = 0x080400
# libcurl's codes that pycurl names under older spellings or not at all.
E_WEIRD_SERVER_REPLY = 8
E_TOO_LARGE = 100


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
    """One GET: ``url`` (no userinfo), extra ``headers``, and the addresses its host may connect to
    (``pinned``: ``host:port:address,...`` for CURLOPT_RESOLVE, or None for a host written as an
    address)."""

    url: str
    headers: list[str]
    allowed: frozenset[str]
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
        self.curl.setopt(pycurl.PREREQFUNCTION, self.before_request)
        self._set: dict[int, Any] = {}  # the per-request options as the handle has them now
        self.start(Request("", [], frozenset()), fresh=False)

    def start(self, request: Request, fresh: bool) -> None:
        """Ready the handle for ``request`` (on a new connection if ``fresh``)."""
        self.request = request
        # The body goes straight into a buffer whose bytes the answer then takes over, uncopied.
        self.body = io.BytesIO()
        self.curl.setopt(pycurl.WRITEFUNCTION, self.body.write)
        self.head_bytes = 0
        self.location: str | None = None
        self.retry_after: str | None = None
        self.head_too_large = self.stale = False
        self.opened = False  # a new connection was opened for it (none was reused)
        if not request.url:
            return
        self.curl.setopt(pycurl.URL, request.url)
        for option, value in (
            (pycurl.HTTPHEADER, request.headers),
            (pycurl.RESOLVE, [request.pinned] if request.pinned else []),
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
        # A second line of defence behind the pinned resolution: no connection to an address the caller
        # did not check, whatever libcurl was told.
        family, socktype, protocol, target = address
        if str(target[0]).split("%", 1)[0] not in self.request.allowed:
            return pycurl.SOCKET_BAD
        self.opened = True
        return socket.socket(family, socktype, protocol)

    def before_request(self, remote_ip: str, local_ip: str, remote_port: int, local_port: int) -> int:
        """Called once the connection is ready and before the request goes: a kept-alive connection
        with something to read is not asked anything (whatever it holds would be read as the answer)."""
        if self.opened:
            return pycurl.PREREQFUNC_OK
        try:
            fd = self.sockets.get((local_ip, local_port, remote_ip, remote_port))
            if fd is None or not select.select([fd], [], [], 0)[0]:
                return pycurl.PREREQFUNC_OK
            self.stale = True
            with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as copy:
                copy.shutdown(socket.SHUT_RDWR)  # never reused again: libcurl sees it closed
        except (OSError, ValueError):
            pass  # the connection is gone already: libcurl will find that out itself
        return pycurl.PREREQFUNC_ABORT if self.stale else pycurl.PREREQFUNC_OK


class _KeptSockets:
    """The socket of each connection libcurl keeps, by its addresses (local and remote IP and port: what
    tells one TCP connection from every other open one), as the last transfer on it left it. libcurl
    does not hand a connection's socket to a callback that runs during a transfer; this is where that
    callback finds it."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._by_connection: OrderedDict[Connection, int] = OrderedDict()

    def get(self, connection: Connection) -> int | None:
        return self._by_connection.get(connection)

    def remember(self, curl: pycurl.Curl) -> None:
        """Note the connection ``curl`` has just finished a transfer on (before it is removed)."""
        fd = int(curl.getinfo(pycurl.ACTIVESOCKET))
        if fd < 0:
            return
        key = (
            str(curl.getinfo(pycurl.LOCAL_IP)),
            int(curl.getinfo(pycurl.LOCAL_PORT)),
            str(curl.getinfo(pycurl.PRIMARY_IP)),
            int(curl.getinfo(pycurl.PRIMARY_PORT)),
        )
        self._by_connection[key] = fd
        self._by_connection.move_to_end(key)
        while len(self._by_connection) > self._limit:  # closed connections' entries age out
            self._by_connection.popitem(last=False)


class Transfers:
    """Runs GETs on one libcurl multi handle from the running asyncio loop; at most ``connections`` open
    at once (more transfers wait inside libcurl for one to free). Use from that loop's thread only."""

    def __init__(self, connections: int) -> None:
        if pycurl.version_info()[2] < _LIBCURL_NEEDED:
            raise RuntimeError(f"images by reference need libcurl 8.4 or newer; pycurl has {pycurl.version}")
        self._loop = asyncio.get_running_loop()
        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self._multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, connections)
        self._multi.setopt(pycurl.M_MAXCONNECTS, connections)
        self._timer: asyncio.TimerHandle | None = None
        self._watched: dict[int, int] = {}
        # The transfers libcurl runs, and where each one's answer goes (not on the transfer: an idle
        # handle's callbacks keep that alive, and must not keep the answer with it).
        self._running: dict[pycurl.Curl, tuple[_Transfer, asyncio.Future[Answer]]] = {}
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
        done: asyncio.Future[Answer] = self._loop.create_future()
        curl = transfer.curl
        self._multi.add_handle(curl)
        self._running[curl] = (transfer, done)
        try:
            return await done
        finally:
            if self._running.pop(curl, None) is not None:  # cancelled while libcurl still ran it
                self._multi.remove_handle(curl)
                curl.close()
            else:
                self._idle.append(transfer)

    def close(self) -> None:
        """Stop every transfer and close every connection."""
        if self._timer is not None:
            self._timer.cancel()
        for curl, (_transfer, done) in list(self._running.items()):
            self._multi.remove_handle(curl)
            curl.close()
            done.cancel()
        self._running.clear()
        for fd in list(self._watched):
            self._unwatch(fd)
        for transfer in self._idle:
            transfer.curl.close()
        self._idle.clear()
        self._multi.close()

    # libcurl tells which sockets to watch and when to call back; the loop does the waiting.

    def _on_socket(self, event: int, fd: int, _multi: object, _data: object) -> None:
        if event == pycurl.POLL_REMOVE:
            self._unwatch(fd)
            return
        wanted = _CSELECT[event]
        if self._watched.get(fd) == wanted:
            return
        self._unwatch(fd)
        if wanted & pycurl.CSELECT_IN:
            self._loop.add_reader(fd, self._act, fd, pycurl.CSELECT_IN)
        if wanted & pycurl.CSELECT_OUT:
            self._loop.add_writer(fd, self._act, fd, pycurl.CSELECT_OUT)
        self._watched[fd] = wanted

    def _unwatch(self, fd: int) -> None:
        wanted = self._watched.pop(fd, 0)
        if wanted & pycurl.CSELECT_IN:
            self._loop.remove_reader(fd)
        if wanted & pycurl.CSELECT_OUT:
            self._loop.remove_writer(fd)

    def _on_timer(self, timeout_ms: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if timeout_ms >= 0:
            self._timer = self._loop.call_later(timeout_ms / 1000, self._act, pycurl.SOCKET_TIMEOUT, 0)

    def _act(self, fd: int, event: int) -> None:
        while True:
            code, _running = self._multi.socket_action(fd, event)
            if code != pycurl.E_CALL_MULTI_PERFORM:
                break
        self._finish_transfers()

    def _finish_transfers(self) -> None:
        while True:
            queued, succeeded, failures = self._multi.info_read()
            for curl in succeeded:
                self._finish(curl, None, "")
            for curl, code, message in failures:
                self._finish(curl, code, message)
            if not queued:
                return

    def _finish(self, curl: pycurl.Curl, code: int | None, message: str) -> None:
        if code is None:
            self._sockets.remember(curl)
        self._multi.remove_handle(curl)
        running = self._running.pop(curl, None)
        if running is None or running[1].done():
            return
        transfer, done = running
        status = int(curl.getinfo(pycurl.RESPONSE_CODE))
        body = transfer.body.getvalue() if code is None and 200 <= status < 300 else b""
        transfer.body.close()  # an idle handle keeps nothing it delivered
        if code is not None:
            length = int(curl.getinfo(pycurl.CONTENT_LENGTH_DOWNLOAD_T))
            done.set_exception(
                TransferFailed(
                    code,
                    message,
                    status,
                    length if length >= 0 else None,
                    transfer.head_too_large,
                    transfer.stale,
                )
            )
            return
        done.set_result(Answer(status, transfer.location, transfer.retry_after, body))


def _constant_options() -> list[tuple[int, Any]]:
    """The options every transfer has. CA certificates are Python's own defaults (so ``SSL_CERT_FILE``
    and ``SSL_CERT_DIR`` work as they do for every other client here), not the path compiled into the
    libcurl that pycurl's wheel carries, which need not exist on this system."""
    options: list[tuple[int, Any]] = [
        (pycurl.NOSIGNAL, 1),
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
