"""The engine under the API: a bounded queue in front of the worker's own stages.

A request's inputs are admitted together or not at all (at most ``--serve-max-queue`` inputs and
``--serve-max-queued-image-bytes`` of inline images in the server, from admission to answer), prepared by
the worker's input handlers (the tokenizer thread, the decode pool, the fetch loop and its SSRF guard),
batched per modality by the worker's :class:`Batcher` (size or
deadline, texts apart from images) on the dispatch thread, and embedded by the worker's
:class:`InferenceStage`. The stage hands each vector back here (this engine is its result sink), and a
request is answered once all its vectors are in, or at its first input that cannot be embedded.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from worker.config import Settings
from worker.errors import RejectedRecord, RejectReason
from worker.fetching.fetcher import Fetcher
from worker.imaging.host import ImageLimits
from worker.inference.embedder import Embedder
from worker.inference.stage import InferenceStage
from worker.intake.batcher import Batch, Batcher
from worker.intake.inputs.base import Outcome, Slot
from worker.intake.inputs.image_bytes import ImageDecoder
from worker.intake.inputs.image_uri import ImageFetcher
from worker.intake.inputs.select import fetch_policy
from worker.intake.inputs.text import TextTokenizer
from worker.intake.stage import Ready, ReadyText, ready_or_rejected
from worker.messages import Modality, Request, Source
from worker.models.heads import ScoreHeads
from worker.models.text import TokenizedText
from worker.ops.metrics import WorkerMetrics
from worker.serving.api import Embeddings
from worker.serving.images import ImageInput
from worker.serving.metrics import ServeMetrics
from worker.work import InputRecord

log = logging.getLogger(__name__)

SOURCE = "serve"  # the source topic of the items serve makes: they come from no topic
_OFFER_WAIT_S = 0.5
_IDLE_WAIT_S = 0.5  # how soon an idle dispatcher notices that the inference thread died
_STOP = None
_FLUSH = "flush"  # wakes the dispatcher to offer every open batch now (draining)


class QueueFull(Exception):
    """The request's inputs do not fit in the queue now (a 429)."""


class Unavailable(Exception):
    """The engine takes no requests: not started, draining, or its inference thread died (a 503)."""


class InputFailed(Exception):
    """Input ``index`` of a request cannot be embedded, for the worker's own ``rejection``."""

    def __init__(self, index: int, rejection: RejectedRecord) -> None:
        super().__init__(rejection.message)
        self.index = index
        self.rejection = rejection


class _Answer:
    """One request's vectors as they come in, from any thread; answered on its event loop once."""

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[Embeddings] = loop.create_future()
        self._loop = loop
        self._lock = threading.Lock()
        self._vectors: list[np.ndarray | None] = [None] * count
        self._scores: list[dict[str, float]] | None = None
        self._missing = count
        self._settled = False
        self.tokens = 0

    def vector(self, index: int, vector: np.ndarray, scores: Mapping[str, float] | None) -> None:
        with self._lock:
            if self._settled:
                return
            self._vectors[index] = vector
            if scores is not None:
                if self._scores is None:
                    self._scores = [{} for _ in self._vectors]
                self._scores[index] = dict(scores)
            self._missing -= 1
            if self._missing:
                return
            self._settled = True
        result = Embeddings(np.stack([v for v in self._vectors if v is not None]), self._scores, self.tokens)
        self._post(result)

    def fail(self, error: Exception) -> None:
        with self._lock:
            if self._settled:
                return
            self._settled = True
        self._post(error)

    def _post(self, outcome: Embeddings | Exception) -> None:
        try:
            self._loop.call_soon_threadsafe(_settle, self.future, outcome)
        except RuntimeError:  # the loop closed (the server stopped past its grace): nobody waits for it
            if not self._loop.is_closed():
                raise


def _settle(future: asyncio.Future[Embeddings], outcome: Embeddings | Exception) -> None:
    if future.done():  # the client went away and the request was cancelled
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


@dataclass(frozen=True)
class _Item:
    """Where one input's result goes."""

    answer: _Answer
    index: int
    record: InputRecord
    request: Request
    image_bytes: int  # of an image sent inline, counted against --serve-max-queued-image-bytes


class EmbeddingEngine:
    """Embeds requests' texts and images with the worker's stages; see the module's docstring."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        metrics: WorkerMetrics,
        serve_metrics: ServeMetrics,
        batch_size: int,
        decode_workers: int,
        heads: ScoreHeads | None = None,
    ) -> None:
        if embedder.text is None:
            raise ValueError("serve needs the model's text tower: load the embedder with texts=True")
        self.dim = embedder.dim
        self._metrics = serve_metrics
        self._max_queue = settings.serve_max_queue
        self._max_image_bytes = settings.serve_max_queued_image_bytes
        limits = ImageLimits(settings.max_image_pixels, settings.min_image_side, settings.max_message_bytes)
        preprocessing = replace(
            embedder.preprocessing,
            resize=settings.resize,
            jpeg_draft=settings.jpeg_draft,
            decode=settings.decode,
        )
        self._tokenizer = TextTokenizer(embedder.text, metrics)
        self._decoder = ImageDecoder(limits, preprocessing, decode_workers, metrics)
        policy = fetch_policy(with_serve_fetch_default(settings), limits)
        self._fetcher = (
            ImageFetcher(Fetcher(policy, metrics), self._decoder, policy.concurrency, forward_image=False)
            if policy.schemes
            else None
        )
        self._stage = InferenceStage(embedder, self, metrics, preprocessing, limits, heads)
        self._batchers: dict[Modality, Batcher[Ready]] = {
            modality: Batcher(batch_size, settings.batch_timeout_s) for modality in Modality
        }
        self._inbox: queue.SimpleQueue[Ready | str | None] = queue.SimpleQueue()
        self._dispatcher = threading.Thread(target=self._dispatch, name="serve-batcher", daemon=True)
        self._lock = threading.Lock()
        self._items: dict[int, _Item] = {}
        self._numbers = itertools.count()
        self._queued = 0
        self._image_bytes = 0  # of the inline images admitted and not yet answered
        self._accepting = False
        self._draining = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the inference and dispatch threads; requests are taken from now on."""
        self._stage.start()
        self._dispatcher.start()
        with self._lock:
            self._accepting = True

    def problem(self) -> str | None:
        """Why the engine cannot answer now (readiness), or None."""
        if self._stage.failure is not None:
            return self._stage.failure
        if self._draining:
            return "draining: shutting down"
        if not self._accepting:
            return "not started"
        if not self._dispatcher.is_alive():
            return "the batching thread died"
        return None

    def drain(self, deadline: float) -> None:
        """Stop taking requests (readiness and new requests answer 503), embed what was admitted at once,
        without waiting for batches to fill, and wait until it is answered; what is left at ``deadline``
        is failed with :class:`Unavailable`."""
        with self._lock:
            self._accepting = False
            self._draining = True
        self._inbox.put(_FLUSH)
        while self.queued and time.monotonic() < deadline and self._stage.failure is None:
            time.sleep(0.01)
        if self.queued:
            self.fail_outstanding("the shutdown grace ran out")

    def close(self, deadline: float) -> None:
        """Drain (see :meth:`drain`), then stop every thread (by ``deadline``)."""
        self.drain(deadline)
        self._inbox.put(_STOP)
        self._dispatcher.join(timeout=max(0.1, deadline - time.monotonic()))
        self._stage.stop(deadline)
        self._tokenizer.shutdown()
        if self._fetcher is not None:
            self._fetcher.shutdown()
        self._decoder.shutdown()

    def fail_outstanding(self, reason: str) -> None:
        """Answer every input admitted and not yet answered with :class:`Unavailable` (a 503): they will not
        be embedded (the inference thread died, or the server stopped)."""
        with self._lock:  # each item is taken once, so each answer fails once
            items = list(self._items.values())
            self._items.clear()
            self._queued = 0
            self._image_bytes = 0
        if items:
            self._metrics.queued.set(0)
            for item in items:
                item.answer.fail(Unavailable(reason))

    @property
    def queued(self) -> int:
        """Inputs admitted and not yet answered."""
        with self._lock:
            return self._queued

    @property
    def queued_image_bytes(self) -> int:
        """Bytes of the inline images admitted and not yet answered."""
        with self._lock:
            return self._image_bytes

    # ------------------------------------------------------------------ requests
    async def embed_texts(self, texts: list[str]) -> Embeddings:
        """The unit vectors of ``texts`` from the text tower. Raises :class:`QueueFull`,
        :class:`Unavailable` or :class:`InputFailed`."""
        answer, items = self._admit([Request(id="", text=text) for text in texts])
        self._prepare(items, self._tokenizer.submit([item.request for item in items]))
        return await answer.future

    async def embed_images(self, images: list[ImageInput]) -> Embeddings:
        """The unit vectors (and scores, with ``--score``) of ``images``, each its bytes or a URI fetched
        under the worker's fetch policy. Raises as :meth:`embed_texts`."""
        requests = [Request(id="", image=image.data, uri=image.uri) for image in images]
        answer, items = self._admit(requests)
        inline = [item for item in items if item.request.image is not None]
        by_uri = [item for item in items if item.request.image is None]
        if inline:
            self._prepare(inline, self._decoder.submit_images([item.request.image or b"" for item in inline]))
        if by_uri:
            if self._fetcher is None:
                rejection = RejectedRecord(
                    RejectReason.FETCH_FORBIDDEN, "this server fetches no URIs (--fetch-schemes is empty)"
                )
                for item in by_uri:
                    self._failed(item, rejection)
            else:
                self._prepare(by_uri, self._fetcher.submit([item.request for item in by_uri]))
        return await answer.future

    def _admit(self, requests: list[Request]) -> tuple[_Answer, list[_Item]]:
        count = len(requests)
        answer = _Answer(count, asyncio.get_running_loop())
        with self._lock:
            if not self._accepting:
                raise Unavailable(self.problem() or "not taking requests")
            if self._stage.failure is not None:
                raise Unavailable(self._stage.failure)
            if self._queued + count > self._max_queue:
                self._metrics.refused.inc(count)
                raise QueueFull(f"{self._queued} inputs queued; {count} more would pass {self._max_queue}")
            image_bytes = sum(len(request.image or b"") for request in requests)
            if self._image_bytes + image_bytes > self._max_image_bytes:
                self._metrics.refused.inc(count)
                raise QueueFull(
                    f"{self._image_bytes} bytes of images queued; {image_bytes} more would pass "
                    f"{self._max_image_bytes} (--serve-max-queued-image-bytes)"
                )
            self._queued += count
            self._image_bytes += image_bytes
            items: list[_Item] = []
            now, wall_ms = time.monotonic(), int(time.time() * 1000)
            for index, request in enumerate(requests):
                number = next(self._numbers)
                record = InputRecord(Source(SOURCE, 0, number), None, None, [], wall_ms, now)
                item = _Item(answer, index, record, request, len(request.image or b""))
                self._items[number] = item
                items.append(item)
        self._metrics.queued.set(self._queued)
        return answer, items

    def _prepare(self, items: list[_Item], slots: list[Slot]) -> None:
        """When each input is prepared (tokenised, or fetched and decoded), hand it to the dispatcher."""
        by_future: dict[Future[list[Outcome]], list[tuple[_Item, int]]] = {}
        for item, slot in zip(items, slots, strict=True):
            by_future.setdefault(slot.future, []).append((item, slot.index))
        for future, waiting in by_future.items():
            future.add_done_callback(partial(self._prepared, waiting))

    def _prepared(self, waiting: list[tuple[_Item, int]], future: Future[list[Outcome]]) -> None:
        outcomes: list[Outcome] | None = None
        if not future.cancelled():
            try:
                outcomes = future.result()
            except Exception as exc:  # the whole chunk failed: each input as the Kafka path would take it
                outcomes = [exc] * (max(index for _item, index in waiting) + 1)
        for item, index in waiting:
            if outcomes is None:  # the handler shut down under it (stopping): not the input's fault
                self._release(item.record)
                item.answer.fail(Unavailable("the server is stopping"))
                continue
            result = ready_or_rejected(item.record, item.request, outcomes[index])
            if isinstance(result, RejectedRecord):
                self._failed(item, result)
                continue
            if isinstance(result, ReadyText):
                item.answer.tokens += _token_count(result.tokens)
            self._inbox.put(result)

    def _failed(self, item: _Item, rejection: RejectedRecord) -> None:
        self._release(item.record)
        item.answer.fail(InputFailed(item.index, rejection))

    def _release(self, record: InputRecord) -> _Item | None:
        with self._lock:
            item = self._items.pop(record.source.offset, None)
            if item is not None:
                self._queued -= 1
                self._image_bytes -= item.image_bytes
            queued = self._queued
        self._metrics.queued.set(queued)
        return item

    # ------------------------------------------------------------------ the stage's result sink
    def embedding(
        self,
        record: InputRecord,
        request: Request,
        vector: np.ndarray,
        scores: Mapping[str, float] | None = None,
        fetched: bytes | None = None,
    ) -> None:
        """The stage embedded an input (on the inference thread)."""
        item = self._release(record)
        if item is not None:
            item.answer.vector(item.index, vector, scores)

    def reject(self, record: InputRecord, rejection: RejectedRecord) -> None:
        """The stage could not embed an input (on the inference thread)."""
        item = self._release(record)
        if item is not None:
            item.answer.fail(InputFailed(item.index, rejection))

    # ------------------------------------------------------------------ the dispatch thread
    def _dispatch(self) -> None:
        """Batch prepared inputs per modality; offer each batch as it closes (size) or falls due."""
        while True:
            self._stage_died()
            due = [s for s in (b.seconds_until_due() for b in self._batchers.values()) if s is not None]
            try:
                ready = self._inbox.get(timeout=min([*due, _IDLE_WAIT_S]))
            except queue.Empty:
                ready = None
                stopping = False
            else:
                stopping = ready is _STOP
            if stopping:
                for batcher in self._batchers.values():
                    self._offer(batcher.drain())
                return
            if ready is not None and not isinstance(ready, str):
                self._offer(self._batchers[ready.modality].add(ready))
            for batcher in self._batchers.values():
                # Draining, nothing more will come to fill a batch: each is due now.
                self._offer(batcher.drain() if self._draining else batcher.take_if_due())

    def _offer(self, batch: Batch[Ready] | None) -> None:
        if batch is None:
            return
        while not self._stage_died():
            if self._stage.offer(batch, wait_s=_OFFER_WAIT_S):
                return

    def _stage_died(self) -> bool:
        """If the inference thread died, fail every input admitted (a 503 each: nothing will embed them)."""
        failure = self._stage.failure
        if failure is None:
            return False
        self.fail_outstanding(failure)
        return True


def with_serve_fetch_default(settings: Settings) -> Settings:
    """``settings`` with serve's fetch default: only ``https`` unless ``--fetch-schemes`` is set. A Kafka
    worker fetches what trusted producers name; serve fetches what any client names, and ``s3://`` or
    ``http://`` would reach the server's own buckets (with its credentials) or plaintext hosts."""
    if settings.fetch_schemes is not None:
        return settings
    return settings.model_copy(update={"fetch_schemes": "https"})


def _token_count(tokens: TokenizedText) -> int:
    """Tokens of a text, padding left out (OpenAI's ``usage``)."""
    return int(tokens.mask.sum()) if tokens.mask is not None else int(tokens.ids.shape[0])
