"""Reading a response body within the byte limit and the time limit, as it streams in."""

from __future__ import annotations

import time
from collections.abc import Iterable

from worker.fetching.outcomes import timed_out, too_large


def read_limited(chunks: Iterable[bytes], max_bytes: int, deadline: float, shown: str) -> bytes:
    """Join ``chunks`` into the body, refusing it as soon as it passes ``max_bytes`` (``fetch_too_large``)
    or the clock passes ``deadline`` (``time.monotonic()``; ``fetch_timeout``): a slow or endless body
    never holds more than the limit, nor a fetch thread past its time."""
    parts: list[bytes] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise too_large(f"{shown} is larger than the image limit of {max_bytes} bytes")
        parts.append(chunk)
        if time.monotonic() > deadline:
            raise timed_out(f"{shown} did not arrive in time ({size} bytes so far)")
    return b"".join(parts)


def check_declared_size(declared: int | None, max_bytes: int, shown: str) -> None:
    """Refuse a body whose declared length is already over the limit, before reading any of it."""
    if declared is not None and declared > max_bytes:
        raise too_large(f"{shown} is {declared} bytes, over the image limit of {max_bytes} bytes")
