"""Requests that carry the encoded image itself: decoded and preprocessed on a bounded thread pool."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from worker.imaging.host import ImageLimits, Preprocessing, prepare
from worker.intake.inputs.base import Outcome, Slot, submit_in_chunks
from worker.messages import Request
from worker.ops.metrics import WorkerMetrics

# Images per decode task, at most: a poll of hundreds of records costs a handful of submissions (each
# holds the GIL the decoders need), while each poll still spreads over every decode thread (see submit).
_DECODE_CHUNK = 32


class ImageDecoder:
    """Decodes and preprocesses image bytes on ``workers`` threads (PIL and torch release the GIL).

    Also the second step of kinds that fetch their image first: :meth:`decode_now` runs on their threads.
    """

    def __init__(
        self, limits: ImageLimits, preprocessing: Preprocessing, workers: int, metrics: WorkerMetrics
    ) -> None:
        self._limits = limits
        self._preprocessing = preprocessing
        self._workers = workers
        self._metrics = metrics
        self._decode_seconds = metrics.stage_seconds.labels("decode")  # labels() costs a lookup per call
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")

    def submit(self, requests: list[Request]) -> list[Slot]:
        """Queue the requests' images for the decode threads."""
        return self.submit_images([request.image or b"" for request in requests])

    def submit_images(self, images: list[bytes]) -> list[Slot]:
        """Queue encoded images for the decode threads; one slot per image, in order."""
        # Chunks small enough that a poll's images still reach every decode thread.
        size = max(1, min(_DECODE_CHUNK, -(-len(images) // (2 * self._workers))))
        return submit_in_chunks(self._pool, self.decode_now, images, size)

    def decode_now(self, images: list[bytes]) -> list[Outcome]:
        """Decode on the calling thread; each image's result, or the exception that rejects it."""
        results: list[Outcome] = []
        for data in images:
            started = time.perf_counter()
            try:
                results.append(prepare(data, self._limits, self._preprocessing))
            except Exception as exc:  # a rejection, or a decoder bug: either way this image's own result
                results.append(exc)
            self._decode_seconds.observe(time.perf_counter() - started)
        return results

    def shutdown(self) -> None:
        """Stop the decode threads without waiting for queued work."""
        self._pool.shutdown(wait=False, cancel_futures=True)
