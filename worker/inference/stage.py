"""The inference stage: one thread that embeds closed batches and hands the vectors to its result sink (the
worker's publisher, or ``serve``'s answers).

On a GPU the forward pass is asynchronous, so the stage queues batch N+1's work on the device before it
waits for batch N's vectors and publishes them: the device computes while the host encodes and sends,
instead of idling through every publish. (On a CPU each launch finishes its work before it returns, so
each batch is published at once, batch after batch.) With ``--decode device`` the next batch's JPEGs are
decoded here too, also while the device still works on the previous batch.

A batch that fails is retried once, then split in halves down to the image that fails, which is
dead-lettered (a CUDA out-of-memory error splits at once), so no image is lost. Batches of texts
(``--texts``) take the same path through the text tower, with their own metrics.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from worker.errors import RejectedRecord, RejectReason
from worker.imaging.device_decode import DeviceJpegDecoder
from worker.imaging.host import ImageLimits, Preprocessing
from worker.inference.embedder import Embedder, PendingEmbeddings
from worker.intake.batcher import Batch
from worker.intake.stage import Ready, ReadyImage, ReadyText
from worker.messages import Request
from worker.models.heads import ScoreHeads
from worker.ops.metrics import WorkerMetrics
from worker.work import InputRecord

log = logging.getLogger(__name__)
_QUEUE_DEPTH = 2  # closed batches waiting for the stage: one launching while one is being finished
_STOP = None


class ResultSink(Protocol):
    """Where the stage hands each item's result: the worker's publisher (to Kafka), or ``serve``'s answers."""

    def embedding(
        self,
        record: InputRecord,
        request: Request,
        vector: np.ndarray,
        scores: Mapping[str, float] | None = None,
        fetched: bytes | None = None,
    ) -> None:
        """The item's unit vector (and its scores, with heads)."""
        ...

    def reject(self, record: InputRecord, rejection: RejectedRecord) -> None:
        """The item cannot be embedded."""
        ...


@dataclass
class _Launched:
    items: list[Ready]
    pending: PendingEmbeddings
    started: float
    retry: bool  # a failure may still be retried once before the batch is split


class InferenceStage:
    """Embeds the batches offered to it on its own thread, in the order offered."""

    def __init__(
        self,
        embedder: Embedder,
        sink: ResultSink,
        metrics: WorkerMetrics,
        preprocessing: Preprocessing,
        limits: ImageLimits,
        heads: ScoreHeads | None = None,
    ) -> None:
        self.embedder = embedder
        self.heads = heads
        self.sink = sink
        self.metrics = metrics
        self._on_device = preprocessing.resize == "device"
        self._device_decoder = (
            DeviceJpegDecoder(embedder.device, limits) if preprocessing.decode == "device" else None
        )
        self._queue: queue.Queue[Batch[Ready] | None] = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._device_free_at = 0.0  # when the device finished the last batch (perf_counter)
        self._failure: BaseException | None = None

    def start(self) -> None:
        """Start the inference thread."""
        self._thread.start()

    @property
    def failure(self) -> str | None:
        """Why the thread died, or None while it runs (or ended normally). Nothing is embedded after it."""
        if self._failure is None:
            return None
        return f"the inference thread died: {type(self._failure).__name__}: {self._failure}"

    def offer(self, batch: Batch[Ready], wait_s: float = 0.0) -> bool:
        """Queue a closed batch, waiting up to ``wait_s`` for room; False if there was none, or if the thread
        died (see :attr:`failure`): a batch queued then would never be embedded."""
        if self._failure is not None:
            return False
        try:
            self._queue.put(batch, timeout=wait_s or None, block=wait_s > 0)
        except queue.Full:
            return False
        return True

    def discard_queued(self) -> None:
        """Drop the batches not yet started (exactly-once abort: they will be read again)."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()

    def stop(self, deadline: float) -> None:
        """Let the thread finish the queued batches, then end it."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(_STOP, timeout=max(0.1, deadline - time.monotonic()))
        except queue.Full:
            log.error("inference did not drain its queue before the shutdown deadline")
            return
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug: the main loop sees it and stops the worker
            self._failure = exc
            log.critical("the inference thread died; the worker stops", exc_info=True)

    def _loop(self) -> None:
        pending: _Launched | None = None
        while True:
            try:
                batch = self._queue.get(block=pending is None)
            except queue.Empty:
                # Nothing to overlap with: publish what the device is finishing now.
                assert pending is not None
                self._finish(pending)
                pending = None
                continue
            launched = self._launch(batch) if batch is not _STOP else None
            if pending is not None:
                self._finish(pending)
            pending = launched
            if pending is not None and not self.embedder.runs_asynchronously:
                self._finish(pending)  # the work is done already: holding it back would only add latency
                pending = None
            if batch is _STOP:
                return

    def _launch(self, batch: Batch[Ready]) -> _Launched | None:
        metrics = self.metrics.of(batch.items[0].modality)
        metrics.closes.labels(batch.cause.value).inc()
        metrics.size.observe(len(batch.items))
        now = time.monotonic()
        queue_wait = metrics.stage("queue_wait")
        for item in batch.items:
            queue_wait.observe(now - item.record.polled_at)
        return self._start(batch.items, retry=True)

    def _start(self, items: list[Ready], retry: bool) -> _Launched | None:
        """Queue the items' embedding on the device; None if nothing is left to wait for (all rejected, or
        a failure handled on the spot)."""
        items, pixels = self._decode_on_device(items)
        if not items:
            return None
        started = time.perf_counter()
        try:
            pending = self._start_embedding(items, pixels)
        except Exception as exc:
            self._recover(items, exc, retry)
            return None
        return _Launched(items, pending, started, retry)

    def _finish(self, launched: _Launched) -> None:
        try:
            vectors = launched.pending.result()
        except Exception as exc:  # an asynchronous device error surfaces here, not at launch
            self._recover(launched.items, exc, launched.retry)
            return
        scores = launched.pending.scores() if self.heads is not None else None
        self._publish(launched.items, vectors, scores, launched.started)

    def _embed_now(self, items: list[Ready], retry: bool) -> None:
        """Embed and publish synchronously: the path of retries and split halves."""
        launched = self._start(items, retry)
        if launched is not None:
            self._finish(launched)

    def _start_embedding(
        self, items: list[Ready], pixels: list[np.ndarray | torch.Tensor] | None
    ) -> PendingEmbeddings:
        texts = [item.tokens for item in items if isinstance(item, ReadyText)]
        if texts:
            return self.embedder.launch_texts(texts)
        if pixels is not None:
            return self.embedder.launch_decoded(pixels, self.heads)
        if self._on_device:
            return self.embedder.launch_decoded([_host_pixels(item) for item in items], self.heads)
        return self.embedder.launch([_host_pixels(item) for item in items], self.heads)

    def _recover(self, items: list[Ready], exc: Exception, retry: bool) -> None:
        """Retry once, then split in halves to isolate the item that fails; out of memory splits at once."""
        out_of_memory = isinstance(exc, torch.cuda.OutOfMemoryError)
        if out_of_memory:
            self.embedder.release_cached_memory()
            log.warning("GPU out of memory on a batch of %d; splitting it", len(items))
        if retry and not out_of_memory:
            log.warning("inference failed on a batch of %d (%s); retrying once", len(items), exc)
            self._embed_now(items, retry=False)
        elif len(items) > 1:
            half = len(items) // 2
            self._embed_now(items[:half], retry=False)
            self._embed_now(items[half:], retry=False)
        else:
            message = f"inference failed: {type(exc).__name__}: {exc}"
            self.sink.reject(items[0].record, RejectedRecord(RejectReason.INFERENCE_FAILED, message))

    def _publish(
        self, items: list[Ready], vectors: np.ndarray, scores: np.ndarray | None, started: float
    ) -> None:
        ready = time.perf_counter()
        metrics = self.metrics.of(items[0].modality)
        # The device works on one batch at a time: count this batch from when it could start on it.
        metrics.stage("inference").observe(ready - max(started, self._device_free_at))
        self._device_free_at = ready
        # A batch of texts has no scores: the heads score image embeddings.
        for index, (item, vector) in enumerate(zip(items, vectors, strict=True)):
            named = self.heads.named(scores[index]) if self.heads is not None and scores is not None else None
            fetched = item.fetched if isinstance(item, ReadyImage) else None
            self.sink.embedding(item.record, item.request, vector, named, fetched)
        metrics.embedded.inc(len(items))
        metrics.stage("publish").observe(time.perf_counter() - ready)

    def _decode_on_device(
        self, batch: list[Ready]
    ) -> tuple[list[Ready], list[np.ndarray | torch.Tensor] | None]:
        """``--decode device``: decode the batch's JPEGs on the model's device; dead-letter what fails.

        Without it, or for a batch of texts, returns the items as they are and no pixels.
        """
        items = [item for item in batch if isinstance(item, ReadyImage)]
        if self._device_decoder is None or not items:
            return batch, None
        started = time.perf_counter()
        refused_before = self._device_decoder.fallbacks
        with self.embedder.on_own_stream():
            results = self._device_decoder.materialise([item.pixels for item in items])
        self.metrics.device_decode_fallbacks.inc(self._device_decoder.fallbacks - refused_before)
        self.metrics.stage_seconds.labels("device_decode").observe(time.perf_counter() - started)
        kept: list[Ready] = []
        pixels: list[np.ndarray | torch.Tensor] = []
        for item, result in zip(items, results, strict=True):
            if isinstance(result, RejectedRecord):
                self.sink.reject(item.record, result)
            else:
                kept.append(item)
                pixels.append(result)
        return kept, pixels


def _host_pixels(item: Ready) -> np.ndarray:
    # Without --decode device every image was decoded on the host.
    assert isinstance(item, ReadyImage) and isinstance(item.pixels, np.ndarray)
    return item.pixels
