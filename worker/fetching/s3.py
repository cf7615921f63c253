"""S3 and S3-compatible object stores through boto3: one thread-safe client shared by the threads
S3 fetches run on.

Credentials, region and endpoint come from boto3's usual chain (``AWS_ACCESS_KEY_ID`` and friends,
``AWS_PROFILE``, ``AWS_ENDPOINT_URL_S3``, instance and pod roles); ``--s3-endpoint-url`` and
``--s3-region`` override the last two. botocore's own retries are off: the fetcher's retry loop is the
one place that decides, for every scheme alike.
"""

from __future__ import annotations

import time
from typing import Any

from worker.fetching.body import check_declared_size, read_limited
from worker.fetching.outcomes import FetchError, failed, forbidden, not_found, timed_out
from worker.fetching.uri import Reference

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_FORBIDDEN = frozenset(
    {
        "AccessDenied",
        "403",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
        "AccountProblem",
    }
)
_THROTTLED = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout"}
)
_CHUNK = 64 * 1024


def s3_client(endpoint_url: str | None, region: str | None, **config: Any) -> Any:
    """A boto3 S3 client as the worker makes it (``config``: more botocore ``Config`` options); what
    lists objects for the worker must address the store the same way."""
    import boto3
    from botocore.config import Config

    # Path-style requests keep the bucket name out of the host name: S3-compatible stores (MinIO, Ceph,
    # R2...) rarely serve virtual hosts.
    options = Config(s3={"addressing_style": "path" if endpoint_url else "auto"}, **config)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=options)


class S3Fetcher:
    """Fetches ``s3://bucket/key`` references."""

    def __init__(
        self,
        max_bytes: int,
        timeout_s: float,
        max_connections: int,
        endpoint_url: str | None = None,
        region: str | None = None,
    ) -> None:
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
        self._client = s3_client(
            endpoint_url,
            region,
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"total_max_attempts": 1},
            max_pool_connections=max_connections,
        )

    def fetch(self, reference: Reference) -> bytes:
        """One try: the object's bytes. Raises :class:`FetchError`."""
        from botocore.exceptions import BotoCoreError, ClientError

        shown = reference.shown
        deadline = time.monotonic() + self._timeout_s
        try:
            response = self._client.get_object(Bucket=reference.host, Key=reference.target)
            body = response["Body"]
            try:
                check_declared_size(response.get("ContentLength"), self._max_bytes, reference)
                return read_limited(body.iter_chunks(_CHUNK), self._max_bytes, deadline, reference)
            finally:
                body.close()
        except FetchError:
            raise
        except ClientError as exc:
            raise _client_error(exc.response, shown) from None
        except BotoCoreError as exc:
            raise _transport_error(exc, shown) from None

    def close(self) -> None:
        """Close the client's connections."""
        self._client.close()


def _client_error(response: dict[str, Any], shown: str) -> FetchError:
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    said = f"{shown}: S3 says {code or 'error'} (HTTP {status})"
    if code in _NOT_FOUND or status == 404:
        return not_found(said)
    if code in _FORBIDDEN or status in (401, 403):
        return forbidden(said)
    if code in _THROTTLED or status in (429, 503) or status >= 500:
        return failed(said, retriable=True)
    return failed(said)


def _transport_error(exc: Exception, shown: str) -> FetchError:
    from botocore.exceptions import (
        ConnectionError,
        ConnectTimeoutError,
        HTTPClientError,
        IncompleteReadError,
        NoCredentialsError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError):
        return timed_out(f"{shown}: no answer in time")
    if isinstance(exc, NoCredentialsError):
        return failed(f"{shown}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a role)")
    if isinstance(exc, IncompleteReadError | ResponseStreamingError):
        return failed(f"{shown}: the object's body broke off", retriable=True)
    if isinstance(exc, ConnectionError | HTTPClientError):
        return failed(f"{shown}: cannot reach the store ({type(exc).__name__})", retriable=True)
    return failed(f"{shown}: {type(exc).__name__}")
