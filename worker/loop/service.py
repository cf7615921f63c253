"""Start-up and lifecycle of the long-running worker: model, clients, metrics, signals, drain."""

from __future__ import annotations

import gc
import logging
import signal
import threading
from dataclasses import dataclass
from types import FrameType

from worker import __version__
from worker.config import Settings
from worker.errors import BrokerLostError, ExitCode, FencedError, StageFailedError, StartupError
from worker.imaging.device_decode import load_jpeg_decoder
from worker.inference.embedder import (
    Embedder,
    ModelSpec,
    configure_cpu_threads,
    default_decode_workers,
    load_embedder,
)
from worker.inference.scores import load_score_heads
from worker.kafka_io import Consumer, check_output_topics, open_consumer, topic_message_limits
from worker.kafka_io.errors import UnreadableRecordError
from worker.loop.pipeline import Pipeline
from worker.ops.health import HealthState
from worker.ops.metrics import WorkerMetrics
from worker.ops.server import MetricsServer
from worker.output.delivery import Delivery, choose
from worker.output.offsets import OffsetTracker
from worker.output.topic_limits import TopicLimits

log = logging.getLogger(__name__)

# Signals that ask for a drain: SIGHUP too, which a closed terminal or some supervisors send.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_CLOSE_TIMEOUT_S = 5.0


@dataclass
class Clients:
    """The worker's Kafka side: its consumer, its delivery guarantee and the topics' size limits."""

    consumer: Consumer
    delivery: Delivery
    tracker: OffsetTracker
    limits: TopicLimits

    def close(self) -> None:
        """Close both clients; with the broker gone this times out quietly (the exit code says why)."""
        try:
            self.consumer.close(timeout_ms=int(_CLOSE_TIMEOUT_S * 1000))
        except Exception as exc:  # closing is best effort
            log.debug("closing the consumer: %s", exc)
        self.delivery.close(timeout=_CLOSE_TIMEOUT_S)


def model_spec(settings: Settings) -> ModelSpec:
    """The model part of the settings."""
    return ModelSpec(
        model=settings.model,
        model_dir=settings.model_dir,
        local_files_only=settings.local_files_only,
        random_weights=settings.random_weights,
        device=settings.device,
        dtype=settings.dtype,
    )


def load_model(settings: Settings, metrics: WorkerMetrics, embedder: Embedder | None = None) -> Embedder:
    """The embedder, loaded (unless given), compiled if asked, and described in the logs and metrics."""
    if settings.decode == "device":
        load_jpeg_decoder()  # fail before the model loads when torchvision is missing
    embedder = embedder or load_embedder(model_spec(settings), texts=settings.texts)
    if settings.texts and embedder.text is None:
        raise StartupError("--texts needs the model's text tower, and this embedder was loaded without it")
    threads = configure_cpu_threads(
        settings.inference_threads,
        decode_workers(settings),
        embedder.parameters if embedder.device.type == "cpu" else 0,
    )
    log.info("torch CPU threads: %d", threads)
    if settings.resize == "device" and embedder.device.type == "cpu":
        log.warning(
            "--resize device%s on a CPU runs on the inference thread; "
            "--resize torch (the default) is several times faster there",
            " --decode device" if settings.decode == "device" else "",
        )
    if settings.compile != "off":
        embedder.compile(settings.compile, batch_size(settings, embedder))
    if embedder.is_random:
        log.warning(
            "RANDOM WEIGHTS: embeddings%s are meaningless; every record says model=%s",
            " and scores" if settings.score else "",
            embedder.label,
        )
    metrics.info.info(
        {
            "model": embedder.label,
            "revision": embedder.revision,
            "dtype": str(embedder.dtype).removeprefix("torch."),
            "device": str(embedder.device),
            "version": __version__,
        }
    )
    log.info("model %s on %s (%s), dim %d", embedder.label, embedder.device, embedder.dtype, embedder.dim)
    return embedder


def batch_size(settings: Settings, embedder: Embedder) -> int:
    """Images per batch: the setting, or sized from the device's free memory."""
    return settings.batch_size or embedder.auto_batch_size()


def decode_workers(settings: Settings) -> int:
    """Decode threads: the setting, or one per core (at most 8)."""
    return settings.decode_workers or default_decode_workers()


def open_clients(settings: Settings, metrics: WorkerMetrics) -> Clients:
    """Connect to Kafka with the delivery guarantee the settings ask for; check the output topics."""
    kind = choose(settings)
    consumer = open_consumer(settings, read_committed=kind.reads_committed)
    limits = TopicLimits(topic_message_limits(settings, [topic for _, topic in settings.output_topics()]))
    tracker = OffsetTracker()
    delivery = kind.open(settings, consumer, tracker, metrics, limits)
    check_output_topics(delivery.producer, settings)
    return Clients(consumer, delivery, tracker, limits)


def run_worker(
    settings: Settings,
    stop: threading.Event | None = None,
    embedder: Embedder | None = None,
    metrics: WorkerMetrics | None = None,
    health: HealthState | None = None,
) -> int:
    """Run until ``stop`` is set (or SIGTERM/SIGINT/SIGHUP in the main thread); returns the exit code.

    Raises :class:`worker.errors.StartupError` for problems a user must fix.
    """
    stop = stop or threading.Event()
    log.info("clip-worker %s starting with %s", __version__, settings.redacted())
    metrics = metrics or WorkerMetrics()
    health = health or HealthState()
    server = None
    if settings.metrics_port:
        server = MetricsServer(settings.metrics_host, settings.metrics_port, metrics, health)
        server.start()
    try:
        embedder = load_model(settings, metrics, embedder)
        heads = load_score_heads(settings, embedder)
        health.model_loaded = True
        clients = open_clients(settings, metrics)
        pipeline = Pipeline(
            settings,
            embedder,
            clients.consumer,
            clients.delivery,
            clients.tracker,
            metrics,
            health,
            batch_size(settings, embedder),
            decode_workers(settings),
            clients.limits,
            metrics.gpu,
            heads,
        )
        _install_signal_handlers(stop)
        try:
            with _StartupObjectsFrozen():
                return _outcome(pipeline, stop)
        finally:
            clients.close()
    finally:
        if server is not None:
            server.stop()


class _StartupObjectsFrozen:
    """Puts what start-up made (torch, transformers, the model, the clients: a few million objects) out of
    the garbage collector's reach while any worker of this process runs.

    Each full collection walked all of them with every thread stopped, and the by-reference path's
    allocations brought one every few seconds (docs/decisions/0005-gc-freeze.md). Counted, because tests
    and the bench run several workers in one process: the first to start freezes, the last to stop
    unfreezes.
    """

    _lock = threading.Lock()
    _running = 0

    def __enter__(self) -> None:
        with self._lock:
            if _StartupObjectsFrozen._running == 0:
                gc.collect()
                gc.freeze()
            _StartupObjectsFrozen._running += 1

    def __exit__(self, *_exc: object) -> None:
        with self._lock:
            _StartupObjectsFrozen._running -= 1
            if _StartupObjectsFrozen._running == 0:
                gc.unfreeze()


def _outcome(pipeline: Pipeline, stop: threading.Event) -> ExitCode:
    """Run the pipeline; its end as an exit code."""
    try:
        clean = pipeline.run(stop)
    except BrokerLostError as exc:
        log.error("%s", exc)
        return ExitCode.BROKER_LOST
    except FencedError as exc:
        log.error("%s", exc)
        return ExitCode.FENCED
    except StageFailedError as exc:
        log.error("%s", exc)
        return ExitCode.STAGE_FAILED
    except UnreadableRecordError as exc:
        log.error(
            "a fetched record batch cannot be read (%s); stopping rather than skipping records nobody can "
            "see: inspect the partition with kafka-dump-log.sh, then move the group past the batch with "
            "kafka-consumer-groups.sh --reset-offsets",
            exc,
        )
        return ExitCode.DAMAGED_LOG
    log.info("clip-worker stopped%s", "" if clean else " with unacknowledged records")
    return ExitCode.OK if clean else ExitCode.UNCLEAN_DRAIN


def _install_signal_handlers(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            return
        log.info("received %s: finishing in-flight work, then exiting", signal.Signals(signum).name)
        stop.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, request_stop)
