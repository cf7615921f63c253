"""``clip-worker serve``: load the model as ``run`` does, start the engine, serve the API with uvicorn, and
on SIGTERM drain (not ready, open batches embedded, the requests under way answered) before exiting 0."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from worker import __version__
from worker.config import Settings
from worker.errors import ExitCode, StartupError
from worker.inference.scores import load_score_heads
from worker.loop.service import batch_size, decode_workers, load_model
from worker.ops.metrics import WorkerMetrics
from worker.serving.app import ServedModel, build_app
from worker.serving.engine import EmbeddingEngine
from worker.serving.limits import ServeLimits
from worker.serving.metrics import ServeMetrics

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_CLOSE_S = 2.0  # to stop the engine's threads once uvicorn is done: its grace was the drain


def served_names(settings: Settings, label: str) -> tuple[str, ...]:
    """The names a request's ``model`` may give: ``--served-model-name`` (else ``--model``) first, then the
    loaded model's label when it differs (``random:...`` for random weights)."""
    first = settings.served_model_name or settings.model
    return tuple(dict.fromkeys([first, label]))


def bind(host: str, port: int) -> socket.socket:
    """The listening socket; raises :class:`StartupError` naming the flags when it cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _name, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise StartupError(
            f"cannot serve on {host}:{port} ({exc.strerror or exc}); free the port or choose another with "
            "--serve-port / --serve-host"
        ) from None
    sock.listen(2048)  # a burst of connections waits in the backlog, not refused by the kernel
    return sock


def uvicorn_config(app: ASGIApp, settings: Settings) -> uvicorn.Config:
    """uvicorn's settings for serve: the worker's logging, no access log or lifespan, the shutdown grace."""
    config = uvicorn.Config(
        app,
        log_config=None,  # the worker's own logging
        access_log=False,
        lifespan="off",
        server_header=False,
    )
    # uvicorn annotates an int but hands it to asyncio.timeout, which takes any seconds: 0.5 stays 0.5.
    config.timeout_graceful_shutdown = settings.shutdown_grace_s  # type: ignore[assignment]
    return config


def run_serve(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code. Raises :class:`StartupError` for problems a user
    must fix (the model, the port)."""
    log.info("clip-worker %s serve starting with %s", __version__, settings.redacted())
    sock = bind(settings.serve_host, settings.serve_port)
    metrics = WorkerMetrics()
    serve_metrics = ServeMetrics(metrics.registry)
    # The text tower is what queries need most: serve always loads it, as `run --texts` does.
    embedder = load_model(settings.model_copy(update={"texts": True}), metrics)
    heads = load_score_heads(settings, embedder)
    engine = EmbeddingEngine(
        settings,
        embedder,
        metrics,
        serve_metrics,
        batch_size(settings, embedder),
        decode_workers(settings),
        heads,
    )
    model = ServedModel(served_names(settings, embedder.label), embedder.dim, int(time.time()))
    app = build_app(engine, model, ServeLimits.from_settings(settings), serve_metrics, metrics.registry)
    server = DrainingServer(uvicorn_config(app, settings), engine, settings.shutdown_grace_s)
    _quiet_after_uvicorn()
    engine.start()
    port = sock.getsockname()[1]
    log.info("serving %s on http://%s:%d/v1/embeddings", model.names[0], settings.serve_host, port)
    try:
        server.run(sockets=[sock])
    finally:
        engine.fail_outstanding("the server stopped")
        engine.close(time.monotonic() + _CLOSE_S)
        sock.close()
    log.info("clip-worker serve stopped")
    return ExitCode.OK


class DrainingServer(uvicorn.Server):
    """uvicorn's server, stopping in serve's order: on SIGTERM (or SIGINT) the engine drains first (readiness
    and new requests answer 503, open batches are embedded at once, within ``grace_s``), then uvicorn stops
    listening and finishes writing the answers. A second signal stops at once, as uvicorn does."""

    def __init__(self, config: uvicorn.Config, engine: EmbeddingEngine, grace_s: float) -> None:
        super().__init__(config)
        self._engine = engine
        self._grace_s = grace_s
        self._drainer: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's signal handler while it serves; runs on the event loop's thread, so it must not block."""
        if self._drainer is not None:
            super().handle_exit(sig, frame)
            return
        log.info("%s: draining (not ready, finishing the requests under way)", signal.Signals(sig).name)
        self._drainer = threading.Thread(target=self._drain, name="serve-drain", daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        self._engine.drain(time.monotonic() + self._grace_s)
        self.should_exit = True


def _quiet_after_uvicorn() -> None:
    """uvicorn handles SIGTERM and SIGINT while it serves (stop accepting, finish the requests under way),
    then raises the signal again for the handler it found: that one must not kill the process."""

    def already_handled(signum: int, _frame: FrameType | None) -> None:
        log.debug("%s after the drain", signal.Signals(signum).name)

    for signum in STOP_SIGNALS:
        signal.signal(signum, already_handled)
