"""Requests that carry a text (``--texts``): tokenised for the model's text tower on one thread.

A chunk of texts is one tokenizer call, a fraction of the cost of one call per text. One thread: that
already tokenises more texts a second than a GPU embeds, and tokenising holds the GIL much of the time, so
more threads would only contend with the poll loop (the figures are in the performance docs).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from worker.errors import RejectedRecord, RejectReason
from worker.intake.inputs.base import Outcome, Slot, submit_in_chunks
from worker.messages import Request
from worker.models.text import TextTower
from worker.ops.metrics import WorkerMetrics

_TOKENIZE_CHUNK = 64


class TextTokenizer:
    """Tokenises the requests' texts with the text tower's tokenizer, off the caller's thread."""

    def __init__(self, tower: TextTower, metrics: WorkerMetrics) -> None:
        self._tower = tower
        self._tokenize_seconds = metrics.stage_seconds.labels("tokenize")  # labels() costs a lookup per call
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    def submit(self, requests: list[Request]) -> list[Slot]:
        """Queue the requests' texts for the tokenizer thread; one slot per request, in order."""
        texts = [request.text or "" for request in requests]
        return submit_in_chunks(self._pool, self.tokenize_now, texts, _TOKENIZE_CHUNK)

    def tokenize_now(self, texts: list[str]) -> list[Outcome]:
        """Tokenise on the calling thread; each text's ids, or the rejection of a text the tokenizer fails
        on (the chunk is tried text by text, so only that one is rejected)."""
        started = time.perf_counter()
        results: list[Outcome]
        try:
            results = list(self._tower.tokenize(texts))
        except Exception:
            results = [self._tokenize_one(text) for text in texts]
        self._tokenize_seconds.observe(time.perf_counter() - started)
        return results

    def _tokenize_one(self, text: str) -> Outcome:
        try:
            return self._tower.tokenize([text])[0]
        except Exception as exc:
            message = f"the tokenizer failed on this text: {type(exc).__name__}: {exc}"
            return RejectedRecord(RejectReason.INFERENCE_FAILED, message)

    def shutdown(self) -> None:
        """Stop the tokenizer thread without waiting for queued work."""
        self._pool.shutdown(wait=False, cancel_futures=True)
