"""The intake stage, between poll and batch: request records in, model-ready images or typed rejections out.

The envelope is decoded on the caller's thread (cheap); images are decoded and preprocessed on a bounded
thread pool (PIL and torch release the GIL), in chunks, since every submission costs GIL time the decoders
need. Results come out in the order the records went in. The queue holds at most what the poll loop let
in, which ``--max-in-flight`` bounds. New input kinds (image URLs, say) plug in here.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from worker.errors import RejectedRecord, RejectReason
from worker.images import EncodedJpeg, ImageLimits, Preprocessing, prepare
from worker.messages import ImageRequest, decode_request
from worker.metrics import WorkerMetrics
from worker.work import InputRecord

# Images per decode task, at most: a poll of hundreds of records costs a handful of submissions (each
# holds the GIL the decoders need), while each poll still spreads over every decode thread (see submit).
_DECODE_CHUNK = 32


@dataclass
class ReadyImage:
    """A decoded (or, with ``--decode device``, checked and still encoded) image waiting for a batch."""

    record: InputRecord
    request: ImageRequest
    pixels: np.ndarray | EncodedJpeg


@dataclass
class Rejected:
    """A record that cannot be embedded, and why."""

    record: InputRecord
    rejection: RejectedRecord


@dataclass
class _Decoding:
    record: InputRecord
    request: ImageRequest
    future: Future[list[np.ndarray | EncodedJpeg | Exception]]
    index: int  # position of this image in its chunk's result list


class IntakeStage:
    """Decodes requests and their images; yields each record's :class:`ReadyImage` or :class:`Rejected`."""

    def __init__(
        self, limits: ImageLimits, preprocessing: Preprocessing, workers: int, metrics: WorkerMetrics
    ) -> None:
        self._limits = limits
        self._preprocessing = preprocessing
        self._workers = workers
        self._metrics = metrics
        self._decode_seconds = metrics.stage_seconds.labels("decode")  # labels() costs a lookup per call
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self._decoding: deque[_Decoding] = deque()
        self._rejected: deque[Rejected] = deque()

    def submit(self, records: list[InputRecord]) -> None:
        """Decode the records' envelopes now and queue their images for the decode threads."""
        accepted: list[tuple[InputRecord, ImageRequest]] = []
        for record in records:
            try:
                accepted.append((record, decode_request(record.value)))
            except RejectedRecord as rejection:
                self._rejected.append(Rejected(record, rejection))
        # A task per chunk of images rather than per image: submitting costs GIL time the decoders need.
        size = max(1, min(_DECODE_CHUNK, -(-len(accepted) // (2 * self._workers))))
        for start in range(0, len(accepted), size):
            chunk = accepted[start : start + size]
            future = self._pool.submit(self._decode_images, [request.image for _record, request in chunk])
            for index, (record, request) in enumerate(chunk):
                self._decoding.append(_Decoding(record, request, future, index))

    def reject(self, record: InputRecord, rejection: RejectedRecord) -> None:
        """Pass on a record refused before intake (one the Kafka client could not read, say)."""
        self._rejected.append(Rejected(record, rejection))

    @property
    def busy(self) -> bool:
        """Images are being decoded."""
        return bool(self._decoding)

    def wait_for_oldest(self, timeout_s: float) -> None:
        """Sleep (without the GIL) until the oldest image is decoded, at most ``timeout_s``."""
        if self._decoding:
            wait([self._decoding[0].future], timeout=timeout_s)

    def collect(self, wait: bool) -> Iterator[ReadyImage | Rejected]:
        """The results ready now, in order (``wait``: every result, waiting for the decoders)."""
        while self._rejected:
            yield self._rejected.popleft()
        while self._decoding and (wait or self._decoding[0].future.done()):
            item = self._decoding.popleft()
            try:
                pixels = item.future.result()[item.index]
            except Exception as exc:  # the whole chunk failed (pool shut down): never lose the record
                pixels = exc
            if isinstance(pixels, RejectedRecord):
                yield Rejected(item.record, pixels)
            elif isinstance(pixels, Exception):
                message = f"decoder crashed: {type(pixels).__name__}: {pixels}"
                yield Rejected(item.record, RejectedRecord(RejectReason.CORRUPT_IMAGE, message))
            else:
                yield ReadyImage(item.record, item.request, pixels)

    def clear(self) -> None:
        """Forget everything queued (exactly-once abort: it will be read again)."""
        self._decoding.clear()
        self._rejected.clear()

    def shutdown(self) -> None:
        """Stop the decode threads without waiting for queued work."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _decode_images(self, images: list[bytes]) -> list[np.ndarray | EncodedJpeg | Exception]:
        results: list[np.ndarray | EncodedJpeg | Exception] = []
        for data in images:
            started = time.perf_counter()
            try:
                results.append(prepare(data, self._limits, self._preprocessing))
            except Exception as exc:  # a rejection, or a decoder bug: either way this image's own result
                results.append(exc)
            self._decode_seconds.observe(time.perf_counter() - started)
        return results
