"""A TCP server on loopback that accepts connections, reads what comes and never answers: a store or an
origin that hangs, so a fetch from it is stuck for as long as its own timeouts allow."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class SilentServer:
    """Accepts on ``127.0.0.1:port`` and keeps every connection open, unanswered, until closed."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._asked = threading.Condition(self._lock)
        self._requests = 0
        self._thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:port``: an S3 endpoint or an origin."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> int:
        """Connections that sent the first bytes of a request."""
        with self._lock:
            return self._requests

    def wait_for_requests(self, count: int, timeout_s: float) -> bool:
        """Wait until ``count`` requests arrived (their connections are left hanging)."""
        with self._asked:
            return self._asked.wait_for(lambda: self._requests >= count, timeout_s)

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        # shutdown() first: on Linux, close() alone does not wake a thread blocked in accept() or recv().
        for sock in [self._listener, *self._snapshot()]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._thread.join(5)

    def _snapshot(self) -> list[socket.socket]:
        with self._lock:
            return list(self._connections)

    def _accept(self) -> None:
        while True:
            try:
                connection, _address = self._listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                self._connections.append(connection)
            threading.Thread(target=self._listen, args=(connection,), daemon=True).start()

    def _listen(self, connection: socket.socket) -> None:
        with contextlib.suppress(OSError):
            if connection.recv(65536):
                with self._asked:
                    self._requests += 1
                    self._asked.notify_all()
            while connection.recv(65536):  # read whatever comes, answer nothing, until either side closes
                pass
