"""What an input kind's handler promises the intake stage."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from worker.imaging.host import EncodedJpeg
from worker.messages import Request
from worker.models.text import TokenizedText

# An image ready for its batch: model-ready pixels (or, with --decode device, a checked JPEG).
Pixels = np.ndarray | EncodedJpeg
# What a handler makes of one request: an image's pixels or a text's token ids.
Prepared = Pixels | TokenizedText


@dataclass(frozen=True)
class Fetched:
    """A prepared image with the bytes it was fetched as: kept only for ``--forward-image``."""

    prepared: Pixels
    image: bytes


# One request's result: its prepared image (with the fetched bytes, when forwarded), or the exception that
# rejects it.
Outcome = Prepared | Fetched | Exception


@dataclass(frozen=True)
class Slot:
    """Where one request's result will appear: item ``index`` of the list ``future`` resolves to.

    Handlers prepare requests in chunks (every submission costs GIL time the workers need), so several
    slots share a future. An item that is an exception is that request's rejection or failure.
    """

    future: Future[list[Outcome]]
    index: int


class InputHandler(Protocol):
    """Turns requests of one input kind into model-ready work, off the caller's thread."""

    def submit(self, requests: list[Request]) -> list[Slot]:
        """Start preparing ``requests``; one slot per request, in order."""
        ...

    def shutdown(self) -> None:
        """Stop the handler's threads without waiting for queued work."""
        ...


Item = TypeVar("Item")


def submit_in_chunks(
    pool: Executor, work: Callable[[list[Item]], list[Outcome]], items: Sequence[Item], size: int
) -> list[Slot]:
    """Queue ``work`` on ``pool`` for ``items`` in chunks of ``size``; one slot per item, in order.

    A task per chunk rather than per item: every submission costs GIL time the pool's threads need.
    """
    slots: list[Slot] = []
    for start in range(0, len(items), size):
        chunk = list(items[start : start + size])
        future = pool.submit(work, chunk)
        slots.extend(Slot(future, index) for index in range(len(chunk)))
    return slots
