"""The one entry point: a ``uri`` in, the image's bytes (or a typed rejection) out, with retries and
metrics; the scheme picks the fetcher. Every fetch runs on one :class:`~worker.fetching.loop.FetchLoop`."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from worker.errors import RejectedRecord, RejectReason
from worker.fetching.files import FileFetcher
from worker.fetching.guard import AddressGuard, Resolver, system_resolver
from worker.fetching.http import HttpFetcher
from worker.fetching.loop import FetchLoop
from worker.fetching.metrics import FetchMetrics
from worker.fetching.outcomes import OK, FetchError, timed_out
from worker.fetching.retry import RetryPolicy, with_retries
from worker.fetching.threads import DaemonThreads
from worker.fetching.uri import SCHEMES, Reference, parse_reference, redact


@dataclass(frozen=True)
class FetchPolicy:
    """What may be fetched, how, and within which limits (from the ``--fetch-*`` settings)."""

    schemes: frozenset[str] = frozenset({"http", "https", "s3"})
    max_bytes: int = 16 * 1024 * 1024
    timeout_s: float = 10.0
    retries: int = 2
    concurrency: int = 128
    allow_hosts: tuple[str, ...] = ()
    allow_private: bool = False
    file_root: Path | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    backoff: RetryPolicy = field(default_factory=RetryPolicy)

    @property
    def retry(self) -> RetryPolicy:
        """The retry policy with this policy's number of retries."""
        return RetryPolicy(self.retries, self.backoff.base_delay_s, self.backoff.max_delay_s)


class _BlockingFetcher(Protocol):
    """A scheme whose client blocks (boto3, file reads): each try runs on a thread of its own, under the
    same deadline as an HTTP try."""

    def fetch(self, reference: Reference) -> bytes: ...

    def close(self) -> None: ...


class Fetcher:
    """Fetches references by URI on its own fetch loop (:attr:`loop`); at most ``policy.concurrency``
    connections per scheme. :meth:`fetch` runs on that loop, :meth:`fetch_blocking` from any other thread."""

    def __init__(
        self, policy: FetchPolicy, metrics: FetchMetrics, resolver: Resolver = system_resolver
    ) -> None:
        unknown = policy.schemes - set(SCHEMES)
        if unknown:
            raise ValueError(f"unknown schemes: {sorted(unknown)}")
        self._policy = policy
        self._metrics = metrics
        self._web: HttpFetcher | None = None
        self._blocking: dict[str, _BlockingFetcher] = {}
        # Threads for what blocks: S3 and file fetches, and host name lookups; made as they are needed.
        # Daemons: a call stuck past its deadline is abandoned, and must not hold the process at exit.
        self._threads = DaemonThreads(policy.concurrency, "fetch")
        if policy.schemes & {"http", "https"}:
            guard = AddressGuard(policy.allow_hosts, policy.allow_private, resolver)
            self._web = HttpFetcher(
                guard, policy.max_bytes, policy.timeout_s, policy.schemes, policy.concurrency, self._threads
            )
        if "s3" in policy.schemes:
            from worker.fetching.s3 import S3Fetcher  # boto3 loads only where S3 is enabled

            self._blocking["s3"] = S3Fetcher(
                policy.max_bytes,
                policy.timeout_s,
                policy.concurrency,
                policy.s3_endpoint_url,
                policy.s3_region,
            )
        if "file" in policy.schemes:
            if policy.file_root is None:
                raise ValueError("the file scheme needs a root directory")
            self._blocking["file"] = FileFetcher(policy.file_root, policy.max_bytes, policy.timeout_s)
        self._retry = policy.retry
        # Each fetch counts itself three times: the labelled children are looked up once, not per fetch.
        labels = (*SCHEMES, "other")
        self._seconds = {scheme: metrics.fetch_seconds.labels(scheme) for scheme in labels}
        self._bytes = {scheme: metrics.fetched_bytes.labels(scheme) for scheme in labels}
        self._ok = {scheme: metrics.fetches.labels(scheme, OK) for scheme in labels}
        self.loop = FetchLoop()

    async def fetch(self, uri: str) -> bytes:
        """The bytes at ``uri`` (on :attr:`loop`). Raises :class:`~worker.errors.RejectedRecord`:
        ``invalid_envelope`` for a malformed URI, a :class:`~worker.fetching.outcomes.FetchError`
        (``fetch_*``) otherwise."""
        started = time.perf_counter()
        scheme = _scheme_label(uri)
        outcome: str | None = OK
        try:
            reference = parse_reference(uri, self._policy.schemes)
            data = await with_retries(
                lambda: self._try(reference),
                self._retry,
                on_retry=lambda _error: self._metrics.fetch_retries.labels(scheme).inc(),
            )
        except RejectedRecord as rejection:
            outcome = rejection.reason.value
            raise
        except asyncio.CancelledError:  # the worker is stopping: not a fetch outcome
            outcome = None
            raise
        except Exception as exc:  # a library bug must not lose the record: it fails like any fetch
            outcome = RejectReason.FETCH_FAILED.value
            raise FetchError(
                RejectReason.FETCH_FAILED, f"{redact(uri)}: fetch crashed ({type(exc).__name__})"
            ) from None
        finally:
            if outcome is not None:
                counted = self._ok[scheme] if outcome is OK else self._metrics.fetches.labels(scheme, outcome)
                counted.inc()
                self._seconds[scheme].observe(time.perf_counter() - started)
        self._bytes[scheme].inc(len(data))
        return data

    def fetch_blocking(self, uri: str) -> bytes:
        """:meth:`fetch` from a thread other than the loop's, waiting for its answer."""
        if self.loop.in_loop():
            raise RuntimeError("fetch_blocking would wait for the loop it runs on: await fetch() there")
        return self.loop.run(self.fetch(uri)).result()

    def close(self) -> None:
        """Close every pool of connections and stop the loop and the threads."""
        self.loop.close(self._close_web())
        self._threads.shutdown(wait=False, cancel_futures=True)
        for fetcher in self._blocking.values():
            fetcher.close()

    async def _try(self, reference: Reference) -> bytes:
        if reference.scheme in self._blocking:
            return await self._try_blocking(self._blocking[reference.scheme], reference)
        assert self._web is not None  # parse_reference admits only enabled schemes
        return await self._web.fetch(reference)

    async def _try_blocking(self, blocking: _BlockingFetcher, reference: Reference) -> bytes:
        """One try on a thread, answered within ``--fetch-timeout-s`` whatever the thread does.

        The clients' own limits (botocore's per-read timeouts, the body's deadline between chunks) cannot
        stop a call stuck in the kernel: a read from a hung file system, a lookup that never returns. Past
        the deadline the try is ``fetch_timeout`` and its thread is left to finish on its own; until it
        does, the pool has one thread fewer (never more than ``--fetch-concurrency`` in all).
        """
        deadline = asyncio.timeout(self._policy.timeout_s)
        try:
            async with deadline:
                return await asyncio.get_running_loop().run_in_executor(
                    self._threads, blocking.fetch, reference
                )
        except TimeoutError:
            if not deadline.expired():
                raise  # the call's own TimeoutError, not the deadline: it fails like any crash
            raise timed_out(f"{reference.shown}: no answer within {self._policy.timeout_s:g}s") from None

    async def _close_web(self) -> None:
        if self._web is not None:
            await self._web.close()


def _scheme_label(uri: str) -> str:
    scheme = uri.partition(":")[0].lower() if isinstance(uri, str) else ""
    return scheme if scheme in SCHEMES else "other"
