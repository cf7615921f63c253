"""A local HTTP origin for images by reference: the by-reference benchmark and the fetching tests.

Serves named objects from memory on 127.0.0.1 with keep-alive, optionally after an added latency, and a
few misbehaving routes to fetch from:

- ``/o/NAME``: the object (404 if there is none)
- ``/slow/SECONDS/NAME``: the object after a pause before the headers
- ``/trickle/SECONDS/NAME``: the object in 1 KiB pieces, a pause between them
- ``/huge/BYTES``: a body of that length, declared in Content-Length
- ``/endless``: zeros with no declared length until the client hangs up
- ``/redirect?to=URL``: 302 to URL; ``/hops/N/NAME``: N redirects, then the object
- ``/status/CODE``: an empty answer with that status
- ``/flaky/KEY/CODE/TIMES/NAME``: the first TIMES requests for KEY get CODE, later ones the object
- ``/truncated/NAME``: the object's full length declared, half of it sent, the connection closed
- ``/malformed``: an answer with a broken header line
- ``/once/NAME``: the object, on a connection kept alive that then drops the next request unanswered (as a
  server does that closes an idle connection at the moment a client reuses it)
- ``/continue/NAME``: an interim ``100 Continue``, then the object
- ``/unframed/NAME``: the object with neither a length nor chunks, ended by closing the connection
- ``/chunked/NAME``: the object in chunked transfer encoding, a few pieces
- ``/double/NAME`` and ``/double/NAME/OTHER``: the object's answer and a second, unasked one (a 404, or
  OTHER's answer), in one write
- ``/late/SECONDS/NAME/OTHER``: NAME's answer; SECONDS later, while the connection is idle, an unasked
  second answer carrying OTHER (what a client must never take for the answer to its next request)
- ``/unsolicited/SECONDS/NAME``: NAME's answer; SECONDS later, bytes that are no answer at all
- ``/many-headers/COUNT`` and ``/many-headers/COUNT/split``: an answer with COUNT short headers, its head
  in one write, or in pieces of 1 KiB
- ``/fat-header/BYTES``: an answer whose one header is that long
- ``/upgrade``: a switch to another protocol, unasked
- ``/reset/NAME``: half the object with neither a length nor chunks, then the connection reset
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

_PIECE = 1024
_UPGRADE = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"


class ImageOrigin:
    """The server; use as a context manager. ``latency_s`` is added before every object's headers; with
    ``tls`` (a server context holding its certificate) it speaks HTTPS."""

    def __init__(
        self, latency_s: float = 0.0, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
    ) -> None:
        self.latency_s = latency_s
        self.objects: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()
        self.connections = 0
        self.serving = 0  # objects being served right now
        self.peak_serving = 0  # the most served at once
        self.unasked_sent = 0  # answers and bytes sent on idle connections (/late, /unsolicited)
        self._lock = threading.Lock()
        self._unasked = threading.Condition(self._lock)
        self._flaky: Counter[str] = Counter()
        self._server = _Server((host, 0), _handler(self))
        if tls is not None:  # each accepted connection shakes hands on its own handler thread
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.port = int(self._server.server_address[1])
        self.host = host
        # A short poll interval: shutdown() waits up to one (the default 0.5 s, in every test's teardown).
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="origin", daemon=True
        )

    def url(self, path: str) -> str:
        """The URL of ``path`` (with its leading slash) on this server."""
        return f"{self.scheme}://{self.host}:{self.port}{path}"

    def put(self, name: str, data: bytes) -> str:
        """Serve ``data`` at ``/o/NAME``; returns its URL."""
        self.objects[name] = data
        return self.url(f"/o/{name}")

    def __enter__(self) -> ImageOrigin:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def lookup(self, name: str) -> bytes | None:
        """The object called ``name``, if it was put."""
        return self.objects.get(name)

    def wait_unasked(self, count: int, timeout_s: float = 5.0) -> None:
        """Wait until ``count`` unasked sends have gone out on idle connections."""
        with self._unasked:
            if not self._unasked.wait_for(lambda: self.unasked_sent >= count, timeout_s):
                raise TimeoutError(f"{self.unasked_sent} of {count} unasked sends went out")

    def _sent_unasked(self) -> None:
        with self._unasked:
            self.unasked_sent += 1
            self._unasked.notify_all()

    def _count(self, path: str) -> None:
        with self._lock:
            self.requests[path] += 1

    def _connected(self) -> None:
        with self._lock:
            self.connections += 1

    def _serve(self, delta: int) -> None:
        with self._lock:
            self.serving += delta
            self.peak_serving = max(self.peak_serving, self.serving)

    def _flaky_turn(self, key: str) -> int:
        with self._lock:
            self._flaky[key] += 1
            return self._flaky[key]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # clients that hang up early (timeouts, size limits) are what the routes are for


def _handler(origin: ImageOrigin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out as separate writes: with Nagle's algorithm each answer on a kept-alive
        # connection waited out the client's delayed ACK (about 40 ms).
        disable_nagle_algorithm = True
        hang_up_next = False  # set by /once: this connection's next request goes unanswered

        def setup(self) -> None:
            super().setup()
            origin._connected()

        def do_GET(self) -> None:
            if self.hang_up_next:
                self.close_connection = True  # the request is read, never answered
                return
            parts = urlsplit(self.path)
            origin._count(parts.path)
            route, _, rest = parts.path.lstrip("/").partition("/")
            args = rest.split("/")
            if route == "o":
                self._object(rest, origin.latency_s)
            elif route == "slow":
                self._object(args[1], float(args[0]))
            elif route == "trickle":
                self._trickle(args[1], float(args[0]))
            elif route == "huge":
                self._zeros(int(args[0]), declared=True)
            elif route == "endless":
                self._zeros(1 << 40, declared=False)
            elif route == "redirect":
                self._redirect(parse_qs(parts.query)["to"][0])
            elif route == "hops":
                hops = int(args[0])
                target = f"/hops/{hops - 1}/{args[1]}" if hops > 1 else f"/o/{args[1]}"
                self._redirect(target)
            elif route == "status":
                self._empty(int(args[0]))
            elif route == "flaky":
                key, code, times, name = args
                if origin._flaky_turn(key) <= int(times):
                    self._empty(int(code), retry_after="0" if int(code) == 429 else None)
                else:
                    self._object(name, 0.0)
            elif route == "truncated":
                self._truncated(rest)
            elif route == "once":
                self._object(rest, 0.0)
                self.hang_up_next = True
            elif route == "continue":
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self._object(rest, 0.0)
            elif route == "unframed":
                self._unframed(rest)
            elif route == "chunked":
                self._chunked(rest)
            elif route == "double":
                other = origin.lookup(args[1]) if len(args) > 1 else None
                second = _answer(other) if other else b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
                self.wfile.write(_answer(origin.lookup(args[0]) or b"") + second)
            elif route == "late":
                self._object(args[1], 0.0)
                self._send_later(float(args[0]), _answer(origin.lookup(args[2]) or b""))
            elif route == "unsolicited":
                self._object(args[1], 0.0)
                self._send_later(float(args[0]), b"\x00garbage, not HTTP\r\n\r\n")
            elif route == "many-headers":
                self._many_headers(int(args[0]), split=args[1:] == ["split"])
            elif route == "upgrade":
                self.wfile.write(_UPGRADE)
                self.close_connection = True
            elif route == "fat-header":
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Fat: " + b"x" * int(args[0]) + b"\r\n\r\n")
                self.close_connection = True
            elif route == "reset":
                self._reset(rest)
            elif route == "malformed":
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nnot a header line\r\n\r\nabc")
                self.close_connection = True
            else:
                self._empty(404)

        def _object(self, name: str, delay_s: float) -> None:
            origin._serve(+1)
            try:
                if delay_s:
                    time.sleep(delay_s)
                data = origin.lookup(name)
                if data is None:
                    self._empty(404)
                    return
                self._head(200, len(data))
                self.wfile.write(data)
            finally:
                origin._serve(-1)

        def _trickle(self, name: str, pause_s: float) -> None:
            data = origin.lookup(name) or b""
            self._head(200, len(data))
            for start in range(0, len(data), _PIECE):
                self.wfile.write(data[start : start + _PIECE])
                self.wfile.flush()
                time.sleep(pause_s)

        def _zeros(self, size: int, declared: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            if declared:
                self.send_header("Content-Length", str(size))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            piece = bytes(64 * _PIECE)
            sent = 0
            try:
                while sent < size:
                    self.wfile.write(piece[: size - sent])
                    sent += len(piece)
            except OSError:
                self.close_connection = True  # the client hung up, as it should

        def _send_later(self, delay_s: float, data: bytes) -> None:
            connection = self.connection

            def send() -> None:
                with contextlib.suppress(OSError):  # the client may have closed it: that is fine
                    connection.sendall(data)
                origin._sent_unasked()

            threading.Timer(delay_s, send).start()

        def _many_headers(self, count: int, split: bool) -> None:
            head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(count))
            head += b"Content-Length: 0\r\n\r\n"
            step = _PIECE if split else len(head)
            pieces = [head[start : start + step] for start in range(0, len(head), step)]
            with contextlib.suppress(OSError):  # the client hangs up once it has seen enough
                for piece in pieces:
                    self.wfile.write(piece)
                    self.wfile.flush()
            self.close_connection = True

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _truncated(self, name: str) -> None:
            data = origin.lookup(name) or b""
            self._head(200, len(data))
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True

        def _reset(self, name: str) -> None:
            data = origin.lookup(name) or b""
            self.wfile.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + data[: len(data) // 2])
            self.wfile.flush()
            # Linger on, for no time, and close before the server's own shutdown sends the end of the
            # stream: the client sees a reset.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

        def _unframed(self, name: str) -> None:
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(origin.lookup(name) or b"")
            self.close_connection = True

        def _chunked(self, name: str) -> None:
            data = origin.lookup(name) or b""
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(data), 4 * _PIECE):
                piece = data[start : start + 4 * _PIECE]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")

        def _empty(self, status: int, retry_after: str | None = None) -> None:
            self.send_response(status)
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _head(self, status: int, length: int) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


def _answer(data: bytes) -> bytes:
    """A whole 200 answer carrying ``data``."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)


class OriginProcess:
    """A folder served at ``/o/NAME`` from a child process (:func:`_serve_files`), so that serving costs
    the measured process no interpreter time (the bench's by-reference row); use as a context manager."""

    def __init__(self, root: Path, latency_s: float) -> None:
        self.root = root
        self.latency_s = latency_s
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    def url(self, path: str) -> str:
        """The URL of ``path`` (with its leading slash) on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def pid(self) -> int:
        """The serving process's id (its CPU time is the origin's cost)."""
        assert self._process is not None, "use OriginProcess as a context manager"
        return self._process.pid

    def __enter__(self) -> OriginProcess:
        command = [sys.executable, "-m", "worker.devtools.origin", str(self.root), str(self.latency_s)]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self._process.kill()
            raise RuntimeError(f"the origin process did not start: {line!r}")
        self.port = int(line)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)


class _FileServer(asyncio.Protocol):
    """One keep-alive connection of :func:`_serve_files`: ``GET /o/NAME`` answered from the file ``NAME``
    under the root, ``latency_s`` after the request arrived. A protocol rather than streams: the origin
    shares the bench's cores, and a coroutine per request cost it about twice the interpreter time."""

    def __init__(self, root: str, latency_s: float) -> None:
        self._root = root
        self._latency_s = latency_s
        self._pending = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the connection to answer on."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        """Answer each complete request (clients send the next only after the answer)."""
        self._pending += data
        while b"\r\n\r\n" in self._pending:
            head, _, self._pending = self._pending.partition(b"\r\n\r\n")
            parts = head.split(b" ", 2)
            path = parts[1].decode("latin-1") if len(parts) > 1 else ""
            if self._latency_s:
                asyncio.get_running_loop().call_later(self._latency_s, self._answer, path)
            else:
                self._answer(path)

    def _answer(self, path: str) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        name = path.removeprefix("/o/")
        data: bytes | None = None
        if path.startswith("/o/") and name and "/" not in name and name not in (".", ".."):
            try:
                with open(os.path.join(self._root, name), "rb") as file:
                    data = file.read()
            except OSError:
                data = None
        if data is None:
            self._transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        else:
            self._transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data)


async def _serve_files(root: Path, latency_s: float) -> None:
    """A lean keep-alive HTTP/1.1 server for ``GET /o/NAME`` (files directly under ``root``), on asyncio:
    the benchmark's origin must cost the shared cores little, as a remote server would cost them nothing."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _FileServer(str(root), latency_s), "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_serve_files(Path(sys.argv[1]).resolve(), float(sys.argv[2])))
