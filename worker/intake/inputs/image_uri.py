"""Requests that name their image by ``uri``: fetched on the fetch loop, then decoded like inline images.

Every fetch runs on one asyncio loop (:class:`~worker.fetching.loop.FetchLoop`), at most
``--fetch-concurrency`` at once. Bodies fetched in the same turn of the loop go to the shared decode pool
together. At most twice ``--fetch-concurrency`` bodies are held at once (being fetched, or fetched and
waiting for the decoders), however far fetching could run ahead; decoded pixels are bounded by
``--max-in-flight``, as for inline images. With ``--forward-image`` the fetched bytes travel on
to the output record.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from functools import partial

from worker.fetching.fetcher import Fetcher
from worker.intake.inputs.base import Fetched, Outcome, Pixels, Slot
from worker.intake.inputs.image_bytes import ImageDecoder
from worker.messages import Request

# Bodies held at once (fetching or fetched, waiting for the decoders), per connection. One per connection
# (the room given back only once the image is decoded) made every hiccup of the decoders stop fetching, and
# the decoders then went without work for a fetch's round trip: by reference / by bytes 0.56-0.60, against
# 0.72-0.75 with fetched bodies unbounded, the same sitting.
_BODIES_PER_CONNECTION = 2


@dataclass(frozen=True)
class _Body:
    """A fetched image on its way to the decoder, and where its result goes."""

    result: Future[list[Outcome]]
    data: bytes


class ImageFetcher:
    """The input handler of ``uri`` requests."""

    def __init__(
        self, fetcher: Fetcher, decoder: ImageDecoder, concurrency: int, forward_image: bool
    ) -> None:
        self._fetcher = fetcher
        self._loop = fetcher.loop
        self._decoder = decoder
        self._forward = forward_image
        # On the loop's thread only: fetches under way (one connection each), free room for bodies (a
        # fetch takes one when it starts and it comes back once its image is decoded), fetches waiting.
        self._connections = concurrency
        self._fetching: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks
        self._free_bodies = _BODIES_PER_CONNECTION * concurrency
        self._waiting: deque[tuple[str, Future[list[Outcome]]]] = deque()
        self._fetched: list[_Body] = []
        self._decode_queued = False
        self._closed = False
        # Room the decode threads gave back, taken up by the loop when it next runs. A decode thread
        # wakes the loop only when nothing else will: no fetch under way (each one's end runs the loop)
        # and fetches waiting for room. Waking it for every image cost the GIL hand-offs that made a
        # thread per fetch slow.
        self._returns_lock = threading.Lock()
        self._returned = 0
        self._wake_on_return = False

    def submit(self, requests: list[Request]) -> list[Slot]:
        """Queue one fetch per request (one hand-over to the loop for them all)."""
        results: list[Future[list[Outcome]]] = [Future() for _ in requests]
        self._loop.call_soon(self._queue, [request.uri or "" for request in requests], results)
        return [Slot(result, 0) for result in results]

    def shutdown(self) -> None:
        """Stop fetching without waiting for queued fetches (their results are cancelled), and close the
        connections."""
        self._closed = True  # read on the loop: nothing new starts
        self._fetcher.close()  # cancels the fetches under way, each cancelling its result
        waiting, self._waiting = self._waiting, deque()
        fetched, self._fetched = self._fetched, []
        for result in [result for _uri, result in waiting] + [body.result for body in fetched]:
            result.cancel()

    def _queue(self, uris: list[str], results: list[Future[list[Outcome]]]) -> None:
        if self._closed:
            for result in results:
                result.cancel()
            return
        self._waiting.extend(zip(uris, results, strict=True))
        self._launch()

    def _launch(self) -> None:
        """Take up returned room and start waiting fetches while connections and room are free (on the
        loop)."""
        with self._returns_lock:
            self._free_bodies += self._returned
            self._returned = 0
        while (
            len(self._fetching) < self._connections
            and self._free_bodies
            and self._waiting
            and not self._closed
        ):
            self._free_bodies -= 1
            task = self._loop.loop.create_task(self._fetch(*self._waiting.popleft()))
            self._fetching.add(task)
            task.add_done_callback(self._fetching.discard)
        with self._returns_lock:
            if self._returned:  # given back meanwhile: take them up on the next turn
                self._loop.loop.call_soon(self._launch)
            self._wake_on_return = bool(self._waiting) and not self._fetching

    async def _fetch(self, uri: str, result: Future[list[Outcome]]) -> None:
        try:
            data = await self._fetcher.fetch(uri)
        except asyncio.CancelledError:
            result.cancel()
            raise
        except Exception as exc:  # a typed rejection (fetch_*, invalid_envelope), kept as this item's result
            self._free_bodies += 1
            with contextlib.suppress(InvalidStateError):  # cancelled by shutdown
                result.set_result([exc])
        else:
            self._fetched.append(_Body(result, data))  # its room comes back once it is decoded
            if not self._decode_queued:  # after this turn of the loop: the bodies it brought go together
                self._decode_queued = True
                self._loop.loop.call_soon(self._decode_fetched)
        self._fetching.discard(asyncio.current_task())  # its connection is free: the next may start
        self._launch()

    def _decode_fetched(self) -> None:
        self._decode_queued = False
        bodies, self._fetched = self._fetched, []
        if not bodies:
            return
        try:
            slots = self._decoder.submit_images([body.data for body in bodies])
        except RuntimeError as exc:  # the decode pool shut down first: never leave a result unresolved
            for body in bodies:
                with contextlib.suppress(InvalidStateError):
                    body.result.set_result([exc])
            return
        tasks: dict[Future[list[Outcome]], list[tuple[_Body, int]]] = {}
        for body, slot in zip(bodies, slots, strict=True):
            tasks.setdefault(slot.future, []).append((body, slot.index))
        for decoded, items in tasks.items():
            decoded.add_done_callback(partial(self._decoded, items))

    def _decoded(self, items: list[tuple[_Body, int]], decoded: Future[list[Outcome]]) -> None:
        """On the decode thread that finished the task: each item's result, then its room back."""
        try:
            outcomes: list[Outcome] | None = decoded.result()
            failure: Exception | None = None
        except Exception as exc:  # the decode pool shut down under it: never lose the record
            outcomes, failure = None, exc
        for body, index in items:
            outcome = outcomes[index] if outcomes is not None else failure
            assert outcome is not None
            if self._forward and isinstance(outcome, Pixels):
                outcome = Fetched(outcome, body.data)
            with contextlib.suppress(InvalidStateError):  # cancelled by shutdown
                body.result.set_result([outcome])
        with self._returns_lock:
            self._returned += len(items)
            wake, self._wake_on_return = self._wake_on_return, False
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing waits for room any more
                self._loop.call_soon(self._launch)
