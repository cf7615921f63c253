"""HTTP(S) fetching on the fetch loop: pooled keep-alive connections opened through the SSRF guard
(:mod:`worker.fetching.http_pool`), one deadline per try, the body read within the byte limit as it
arrives, redirects followed here (limited, each hop's scheme and address checked again).

The client is our own thin layer over asyncio's transports and httptools' parser
(:mod:`worker.fetching.http_connection`): a GET, its status, two headers and a body is all a fetch needs,
and on a worker bound by its interpreter the general-purpose clients' request machinery was the cost.
Measured on 2 cores (``clip-worker bench --sections fetch-cost``), a fetch through the fetcher took
0.31-0.47 ms of CPU on aiohttp and 0.13-0.14 ms on this layer (BENCHMARKS.md, "Images by reference").
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from concurrent.futures import Executor
from urllib.parse import urljoin

from worker.fetching.body import over_the_limit
from worker.fetching.guard import AddressGuard
from worker.fetching.http_connection import BodyTooLarge, ConnectionBroke, MalformedAnswer, Response
from worker.fetching.http_pool import ConnectionPool
from worker.fetching.outcomes import FetchError, failed, forbidden, not_found, timed_out
from worker.fetching.uri import DEFAULT_PORTS, Reference, parse_reference

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRIABLE_STATUS = frozenset({408, 425, 429})
_HEADERS = (
    b"User-Agent: clip-worker\r\n"
    b"Accept: image/*, */*;q=0.5\r\n"
    b"Accept-Encoding: identity\r\n"  # images are compressed already
)


class HttpFetcher:
    """Fetches ``http://`` and ``https://`` references; used from the fetch loop only (host names are
    looked up on ``lookups``, threads of its own: the system resolver blocks)."""

    def __init__(
        self,
        guard: AddressGuard,
        max_bytes: int,
        timeout_s: float,
        enabled: frozenset[str],
        connections: int,
        lookups: Executor,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
        self._redirect_schemes = enabled & {"http", "https"}
        self._pool = ConnectionPool(guard, lookups, ssl_context or ssl.create_default_context(), connections)

    async def fetch(self, reference: Reference) -> bytes:
        """One try: the body of ``reference`` after at most :data:`MAX_REDIRECTS` redirects, within one
        ``timeout_s`` deadline. Raises :class:`FetchError`."""
        current = reference
        try:
            async with asyncio.timeout(self._timeout_s):
                for _hop in range(MAX_REDIRECTS + 1):
                    response = await self._get(current, reference)
                    if response.status not in _REDIRECTS or not response.location:
                        return answer_body(response, reference)
                    current = self._redirect_target(current, reference, response.location)
        except TimeoutError:
            raise timed_out(f"{reference.shown}: no answer within {self._timeout_s:g}s") from None
        raise failed(f"{reference.shown}: more than {MAX_REDIRECTS} redirects")

    async def close(self) -> None:
        """Close the pooled connections."""
        await self._pool.close()

    async def _get(self, current: Reference, original: Reference) -> Response:
        head = _request_head(current, original)
        origin = (current.scheme, current.host, current.port)
        fresh = kept_alive = False
        while True:
            try:
                async with self._pool.connection(origin, fresh) as connection:
                    kept_alive = connection.requests > 0
                    return await connection.request(head, self._max_bytes)
            except ConnectionBroke as exc:
                if kept_alive and exc.before_answer and not fresh:
                    fresh = True  # the server closed it while it was idle: once more, on a new one
                    continue
                raise failed(f"{original.shown}: the response broke off ({exc})", retriable=True) from None
            except BodyTooLarge as exc:
                raise over_the_limit(original, self._max_bytes, exc.declared) from None
            except MalformedAnswer as exc:
                raise failed(f"{original.shown}: the answer is not valid HTTP ({exc})") from None
            except ssl.SSLCertVerificationError as exc:
                raise failed(f"{original.shown}: certificate check failed ({exc.verify_message})") from None
            except FetchError:
                raise
            except OSError as exc:
                reason = f"{type(exc).__name__}: {exc.strerror or exc}"
                raise failed(f"{original.shown}: connection failed ({reason})", retriable=True) from None

    def _redirect_target(self, current: Reference, original: Reference, location: str) -> Reference:
        target = urljoin(current.uri, location)
        try:
            return parse_reference(target, self._redirect_schemes)
        except FetchError:
            raise forbidden(f"{original.shown} redirects to a scheme that is not enabled") from None
        except Exception:
            raise failed(f"{original.shown} redirects to an invalid location") from None


def _request_head(current: Reference, original: Reference) -> bytes:
    """The request line and headers of a GET for ``current`` (parse_reference admitted printable ASCII
    only: nothing here can break a line)."""
    host = f"[{current.host}]" if ":" in current.host else current.host
    if current.port != DEFAULT_PORTS[current.scheme]:
        host += f":{current.port}"
    head = f"GET {current.target} HTTP/1.1\r\nHost: {host}\r\n".encode("ascii") + _HEADERS
    # Basic credentials from the URI's userinfo go to its own origin only, never across a redirect.
    if original.username is not None and current.origin == original.origin:
        pair = f"{original.username}:{original.password or ''}".encode()
        head += b"Authorization: Basic " + base64.b64encode(pair) + b"\r\n"
    return head + b"\r\n"


def answer_body(response: Response, reference: Reference) -> bytes:
    """The body of a 2xx answer; any other status as its typed :class:`FetchError`."""
    status = response.status
    if 200 <= status < 300:
        return response.body
    if status in (404, 410):
        raise not_found(f"{reference.shown}: HTTP {status}")
    if status in (401, 403):
        raise forbidden(f"{reference.shown}: the server refused access (HTTP {status})")
    if status in _RETRIABLE_STATUS or status >= 500:
        retry_after = response.retry_after
        hint = float(retry_after) if retry_after and retry_after.isascii() and retry_after.isdigit() else None
        raise failed(f"{reference.shown}: HTTP {status}", retriable=True, retry_after_s=hint)
    raise failed(f"{reference.shown}: HTTP {status}")
