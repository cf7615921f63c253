"""Reading a response body within the byte limit and the time limit, as it streams in."""

from __future__ import annotations

import time
from collections.abc import Iterable

from worker.fetching.outcomes import FetchError, timed_out, too_large
from worker.fetching.uri import Reference


class LimitedBody:
    """A body gathered chunk by chunk, refused as soon as it passes ``max_bytes`` (``fetch_too_large``)
    or the clock passes ``deadline`` (``time.monotonic()``; ``fetch_timeout``; None where the caller
    bounds the time itself): a slow or endless body never holds more than the limit, nor a fetch past its
    time. Errors name ``reference`` redacted."""

    def __init__(self, max_bytes: int, deadline: float | None, reference: Reference) -> None:
        self._max_bytes = max_bytes
        self._deadline = deadline
        self._reference = reference
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, chunk: bytes) -> None:
        """Take the next chunk; raises :class:`~worker.fetching.outcomes.FetchError` past a limit."""
        self._size += len(chunk)
        if self._size > self._max_bytes:
            raise over_the_limit(self._reference, self._max_bytes)
        self._parts.append(chunk)
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise timed_out(f"{self._reference.shown} did not arrive in time ({self._size} bytes so far)")

    def join(self) -> bytes:
        """The whole body."""
        return self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)


def read_limited(chunks: Iterable[bytes], max_bytes: int, deadline: float, reference: Reference) -> bytes:
    """Join ``chunks`` into the body within the limits of :class:`LimitedBody`."""
    body = LimitedBody(max_bytes, deadline, reference)
    for chunk in chunks:
        body.add(chunk)
    return body.join()


def check_declared_size(declared: int | None, max_bytes: int, reference: Reference) -> None:
    """Refuse a body whose declared length is already over the limit, before reading any of it."""
    if declared is not None and declared > max_bytes:
        raise over_the_limit(reference, max_bytes, declared)


def over_the_limit(reference: Reference, max_bytes: int, declared: int | None = None) -> FetchError:
    """The ``fetch_too_large`` rejection of ``reference``: by its ``declared`` size, when that alone was
    over the limit, else by the bytes that came."""
    if declared is not None:
        return too_large(f"{reference.shown} is {declared} bytes, over the image limit of {max_bytes} bytes")
    return too_large(f"{reference.shown} is larger than the image limit of {max_bytes} bytes")
