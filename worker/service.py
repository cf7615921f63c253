"""Start-up and lifecycle of the long-running worker: model, clients, metrics, signals, drain."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from types import FrameType

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from worker import __version__
from worker.config import Settings
from worker.device_decode import load_jpeg_decoder
from worker.embedder import (
    Embedder,
    ModelSpec,
    configure_cpu_threads,
    default_decode_workers,
    load_embedder,
)
from worker.errors import BrokerLostError, FencedError, StageFailedError
from worker.kafka_io import check_output_topics, make_consumer, make_producer, topic_message_limits
from worker.metrics import HealthState, MetricsServer, WorkerMetrics
from worker.pipeline import Pipeline
from worker.transactions import transactional_id

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_UNCLEAN_DRAIN = 3
EXIT_BROKER_LOST = 4
EXIT_TRANSACTION_FENCED = 5  # another process took this worker's transactional or group instance id
EXIT_STAGE_FAILED = 6
# Signals that ask for a drain: SIGHUP too, which a closed terminal or some supervisors send.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_CLOSE_TIMEOUT_MS = 5000


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


def run_worker(
    settings: Settings,
    stop: threading.Event | None = None,
    embedder: Embedder | None = None,
    metrics: WorkerMetrics | None = None,
    health: HealthState | None = None,
) -> int:
    """Run until ``stop`` is set (or SIGTERM/SIGINT in the main thread); returns the exit code.

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
        if settings.decode == "device":
            load_jpeg_decoder()  # fail before the model loads when torchvision is missing
        embedder = embedder or load_embedder(model_spec(settings))
        threads = configure_cpu_threads(
            settings.inference_threads,
            settings.decode_workers or default_decode_workers(),
            embedder.parameters if embedder.device.type == "cpu" else 0,
        )
        log.info("torch CPU threads: %d", threads)
        if settings.resize == "device" and embedder.device.type == "cpu":
            log.warning(
                "--resize device%s on a CPU runs on the inference thread; "
                "--resize torch (the default) is several times faster there",
                " --decode device" if settings.decode == "device" else "",
            )
        batch_size = settings.batch_size or embedder.auto_batch_size()
        if settings.compile != "off":
            embedder.compile(settings.compile, batch_size)
        health.model_loaded = True
        if embedder.is_random:
            log.warning(
                "RANDOM WEIGHTS: embeddings are meaningless; every record says model=%s", embedder.label
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
        consumer = make_consumer(settings)
        txn_id = transactional_id(settings) if settings.exactly_once else None
        if txn_id is not None:
            log.info("exactly-once mode: transactional id %s, read_committed input", txn_id)
        limits = topic_message_limits(settings, [settings.output_topic, settings.dlq_topic])
        smallest_limit = min(limits.values(), default=None)
        producer = make_producer(settings, txn_id, smallest_limit)
        check_output_topics(producer, settings)
        pipeline = Pipeline(
            settings,
            embedder,
            consumer,
            producer,
            metrics,
            health,
            metrics.gpu,
            batch_size,
            limits,
            reopen_producer=lambda: make_producer(settings, txn_id, smallest_limit),
        )
        _install_signal_handlers(stop)
        try:
            clean = pipeline.run(stop)
        except BrokerLostError as exc:
            log.error("%s", exc)
            return EXIT_BROKER_LOST
        except FencedError as exc:
            log.error("%s", exc)
            return EXIT_TRANSACTION_FENCED
        except StageFailedError as exc:
            log.error("%s", exc)
            return EXIT_STAGE_FAILED
        finally:
            _close_quietly(consumer, pipeline.publisher.producer)
        log.info("clip-worker stopped%s", "" if clean else " with unacknowledged records")
        return EXIT_OK if clean else EXIT_UNCLEAN_DRAIN
    finally:
        if server is not None:
            server.stop()


def _close_quietly(consumer: KafkaConsumer, producer: KafkaProducer) -> None:
    # With the broker gone, closing times out; the exit code already says what happened.
    with contextlib.suppress(KafkaError):
        consumer.close(autocommit=False, timeout_ms=_CLOSE_TIMEOUT_MS)
    with contextlib.suppress(KafkaError):
        producer.close(timeout=_CLOSE_TIMEOUT_MS / 1000)


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
