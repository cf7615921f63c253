"""The one entry point: a ``uri`` in, the image's bytes (or a typed rejection) out, with retries and
metrics; the scheme picks the fetcher."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from worker.errors import RejectedRecord, RejectReason
from worker.fetching.files import FileFetcher
from worker.fetching.guard import AddressGuard, Resolver, system_resolver
from worker.fetching.http import HttpFetcher
from worker.fetching.outcomes import OK, FetchError
from worker.fetching.retry import RetryPolicy, with_retries
from worker.fetching.uri import SCHEMES, Reference, parse_reference, redact
from worker.metrics import WorkerMetrics


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


class _SchemeFetcher(Protocol):
    def fetch(self, reference: Reference) -> bytes: ...

    def close(self) -> None: ...


class Fetcher:
    """Fetches references by URI; thread-safe, meant to be called from a pool of
    ``policy.concurrency`` threads (connections are pooled to that size)."""

    def __init__(
        self,
        policy: FetchPolicy,
        metrics: WorkerMetrics,
        resolver: Resolver = system_resolver,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        unknown = policy.schemes - set(SCHEMES)
        if unknown:
            raise ValueError(f"unknown schemes: {sorted(unknown)}")
        self._policy = policy
        self._metrics = metrics
        self._sleep = sleep
        self._fetchers: dict[str, _SchemeFetcher] = {}
        if policy.schemes & {"http", "https"}:
            guard = AddressGuard(policy.allow_hosts, policy.allow_private, resolver)
            web = HttpFetcher(guard, policy.max_bytes, policy.timeout_s, policy.schemes)
            self._fetchers.update({scheme: web for scheme in policy.schemes & {"http", "https"}})
        if "s3" in policy.schemes:
            from worker.fetching.s3 import S3Fetcher  # boto3 loads only where S3 is enabled

            self._fetchers["s3"] = S3Fetcher(
                policy.max_bytes,
                policy.timeout_s,
                policy.concurrency,
                policy.s3_endpoint_url,
                policy.s3_region,
            )
        if "file" in policy.schemes:
            if policy.file_root is None:
                raise ValueError("the file scheme needs a root directory")
            self._fetchers["file"] = FileFetcher(policy.file_root, policy.max_bytes)

    def fetch(self, uri: str) -> bytes:
        """The bytes at ``uri``. Raises :class:`~worker.errors.RejectedRecord`: ``invalid_envelope`` for a
        malformed URI, a :class:`~worker.fetching.outcomes.FetchError` (``fetch_*``) otherwise."""
        started = time.perf_counter()
        scheme = _scheme_label(uri)
        outcome = OK
        try:
            reference = parse_reference(uri, self._policy.schemes)
            fetcher = self._fetchers[reference.scheme]
            data = with_retries(
                lambda: fetcher.fetch(reference),
                self._policy.retry,
                on_retry=lambda _error: self._metrics.fetch_retries.labels(scheme).inc(),
                sleep=self._sleep,
            )
        except RejectedRecord as rejection:
            outcome = rejection.reason.value
            raise
        except Exception as exc:  # a library bug must not lose the record: it fails like any fetch
            outcome = RejectReason.FETCH_FAILED.value
            raise FetchError(
                RejectReason.FETCH_FAILED, f"{redact(uri)}: fetch crashed ({type(exc).__name__})"
            ) from None
        finally:
            self._metrics.fetches.labels(scheme, outcome).inc()
            self._metrics.fetch_seconds.labels(scheme).observe(time.perf_counter() - started)
        self._metrics.fetched_bytes.labels(scheme).inc(len(data))
        return data

    def close(self) -> None:
        """Close every pool of connections."""
        for fetcher in {id(f): f for f in self._fetchers.values()}.values():
            fetcher.close()


def _scheme_label(uri: str) -> str:
    scheme = uri.partition(":")[0].lower() if isinstance(uri, str) else ""
    return scheme if scheme in SCHEMES else "other"
