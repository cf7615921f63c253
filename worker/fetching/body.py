"""Reading a response body within the byte limit and the time limit, as it streams in."""

from __future__ import annotations

import time
from collections.abc import Iterable

from worker.fetching.outcomes import FetchError, timed_out, too_large
from worker.fetching.uri import Reference


def read_limited(chunks: Iterable[bytes], max_bytes: int, deadline: float, reference: Reference) -> bytes:
    """Join ``chunks`` into the body, refusing it as soon as it passes ``max_bytes`` (``fetch_too_large``)
    or the clock passes ``deadline`` (``time.monotonic()``; ``fetch_timeout``): a slow or endless body
    never holds more than the limit, nor a fetch past its time. Errors name ``reference`` redacted."""
    parts: list[bytes] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise over_the_limit(reference, max_bytes)
        parts.append(chunk)
        if time.monotonic() > deadline:
            raise timed_out(f"{reference.shown} did not arrive in time ({size} bytes so far)")
    return parts[0] if len(parts) == 1 else b"".join(parts)


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
