"""The HTTP server of ``/metrics``, ``/healthz`` and ``/readyz``: a thread per connection, bounded."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.errors import StartupError
from worker.ops.health import HealthState
from worker.ops.metrics import WorkerMetrics

log = logging.getLogger(__name__)

# Scrapers and probes need a handful of connections; beyond this, new ones are closed at once, and an idle
# connection is dropped after the timeout, so no client can pin threads.
MAX_CONNECTIONS = 16
CONNECTION_TIMEOUT_S = 10.0


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most :data:`MAX_CONNECTIONS` at once; errors go to the log."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("metrics server: %d connections open; refusing one more", MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-reply (a probe timing out) is routine: one debug line, no traceback.
        log.debug("metrics server: connection from %s ended early", client_address, exc_info=True)


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on one port from a daemon thread.

    Raises :class:`worker.errors.StartupError` when the address cannot be bound.
    """

    def __init__(self, host: str, port: int, metrics: WorkerMetrics, health: HealthState) -> None:
        handler = _make_handler(metrics, health)
        try:
            self._server = _BoundedHTTPServer((host, port), handler)
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); "
                "free the port or choose another with --metrics-port / --metrics-host (0 disables)"
            ) from None
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        """Start serving."""
        self._thread.start()
        log.info("metrics and health on port %d (/metrics /healthz /readyz)", self.port)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()


def _make_handler(metrics: WorkerMetrics, health: HealthState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = CONNECTION_TIMEOUT_S

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                problem = health.liveness_problem()
                body = b"ok\n" if problem is None else f"stalled: {problem}\n".encode()
                self._reply(200 if problem is None else 503, body)
            elif path == "/readyz":
                problem = health.readiness_problem()
                body = b"ready\n" if problem is None else f"not ready: {problem}\n".encode()
                self._reply(200 if problem is None else 503, body)
            else:
                self._reply(404, b"not found\n")

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler
