"""Requests that name their image by ``uri``: fetched on a bounded pool, then decoded like inline images.

Each fetch thread fetches one image, hands the bytes to the shared decode pool and waits for its result,
so fetching overlaps decoding and inference while at most ``--fetch-concurrency`` fetched bodies are held
at once, however far fetching runs ahead (decoded pixels are bounded by ``--max-in-flight``, as for
inline images). With ``--forward-image`` the fetched bytes travel on to the output record.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from worker.fetching.fetcher import Fetcher
from worker.images import EncodedJpeg
from worker.inputs.base import Fetched, Outcome, Slot
from worker.inputs.image_bytes import ImageDecoder
from worker.messages import Request


class ImageFetcher:
    """The input handler of ``uri`` requests."""

    def __init__(
        self, fetcher: Fetcher, decoder: ImageDecoder, concurrency: int, forward_image: bool
    ) -> None:
        self._fetcher = fetcher
        self._decoder = decoder
        self._forward = forward_image
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fetch")

    def submit(self, requests: list[Request]) -> list[Slot]:
        """Queue one fetch per request (fetches wait on the network, so they are not chunked)."""
        return [Slot(self._pool.submit(self._fetch_and_decode, request.uri or ""), 0) for request in requests]

    def shutdown(self) -> None:
        """Stop the fetch threads without waiting for queued fetches, and close the connections."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._fetcher.close()

    def _fetch_and_decode(self, uri: str) -> list[Outcome]:
        try:
            data = self._fetcher.fetch(uri)
        except Exception as exc:  # a typed rejection (fetch_*, invalid_envelope), kept as this item's result
            return [exc]
        [slot] = self._decoder.submit_images([data])
        result = slot.future.result()[slot.index]
        if self._forward and isinstance(result, np.ndarray | EncodedJpeg):
            return [Fetched(result, data)]
        return [result]
