"""Bounded retries with exponential backoff and full jitter, for retriable fetch failures only."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from worker.fetching.outcomes import FetchError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` further tries after the first; the n-th waits a random time up to
    ``min(max_delay_s, base_delay_s * 2**n)``, or the server's Retry-After if longer (capped the same)."""

    retries: int = 2
    base_delay_s: float = 0.1
    max_delay_s: float = 2.0

    def delay(self, retry: int, hint_s: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2**retry)
        wait = random.uniform(0, ceiling)
        if hint_s is not None:
            wait = max(wait, min(hint_s, self.max_delay_s))
        return wait


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    on_retry: Callable[[FetchError], None] = lambda _error: None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """``await attempt()``, tried again after a retriable :class:`FetchError` up to ``policy.retries``
    times; the last error is raised as it is (its reason says what failed: fetch_timeout, fetch_failed...)."""
    retry = 0
    while True:
        try:
            return await attempt()
        except FetchError as error:
            if not error.retriable or retry >= policy.retries:
                raise
            on_retry(error)
            await sleep(policy.delay(retry, error.retry_after_s))
            retry += 1
