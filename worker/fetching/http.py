"""HTTP(S) fetching with aiohttp on the fetch loop: pooled keep-alive connections through the SSRF guard's
resolver, one deadline per try, the body streamed within the byte limit, redirects followed here (limited,
each hop's scheme and address checked again).

aiohttp because the fetches share one asyncio loop (see :mod:`worker.fetching.loop`) and its response
parser is compiled: a fetch costs the worker a fraction of the interpreter time a pure-Python client does.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from concurrent.futures import Executor
from urllib.parse import urljoin

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from worker.fetching.body import LimitedBody, check_declared_size
from worker.fetching.guard import AddressGuard, GuardedResolver
from worker.fetching.outcomes import FetchError, failed, forbidden, not_found, timed_out
from worker.fetching.uri import DEFAULT_PORTS, Reference, parse_reference

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRIABLE_STATUS = frozenset({408, 425, 429})
_HEADERS = {
    "User-Agent": "clip-worker",
    "Accept": "image/*, */*;q=0.5",
    "Accept-Encoding": "identity",  # images are compressed already
}
_CHUNK = 64 * 1024


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
        self._guard = guard
        self._lookups = lookups
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
        self._redirect_schemes = enabled & {"http", "https"}
        self._connections = connections
        self._ssl_context = ssl_context or ssl.create_default_context()
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self, reference: Reference) -> bytes:
        """One try: the body of ``reference`` after at most :data:`MAX_REDIRECTS` redirects, within one
        ``timeout_s`` deadline. Raises :class:`FetchError`."""
        current = reference
        try:
            async with asyncio.timeout(self._timeout_s):
                for _hop in range(MAX_REDIRECTS + 1):
                    body, location = await self._get(current, reference)
                    if location is None:
                        return body
                    current = self._redirect_target(current, reference, location)
        except TimeoutError:
            raise timed_out(f"{reference.shown}: no answer within {self._timeout_s:g}s") from None
        raise failed(f"{reference.shown}: more than {MAX_REDIRECTS} redirects")

    async def close(self) -> None:
        """Close the pooled connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on the loop that will use it
            connector = aiohttp.TCPConnector(
                limit=self._connections,
                limit_per_host=0,
                resolver=GuardedResolver(self._guard, self._lookups),
                ssl=self._ssl_context,
                keepalive_timeout=30.0,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # one image's cookies are no other's business
                timeout=aiohttp.ClientTimeout(total=None),  # the deadline is ours, across redirects
                auto_decompress=False,
                headers=_HEADERS,
            )
        return self._session

    async def _get(self, current: Reference, original: Reference) -> tuple[bytes, str | None]:
        self._guard.check_written(current.host)  # aiohttp asks no resolver about a written-out address
        try:
            async with self._client().get(
                _url(current), headers=_credentials(current, original), allow_redirects=False
            ) as response:
                status = response.status
                if status in _REDIRECTS:
                    location = _header(response.headers, "Location")
                    if location:
                        return b"", location
                if not 200 <= status < 300:
                    raise _status_error(status, original.shown, _header(response.headers, "Retry-After"))
                declared = response.content_length
                check_declared_size(declared, self._max_bytes, original)
                if declared is not None:  # within the limit: read whole (a short body is an error)
                    return await response.read(), None
                body = LimitedBody(self._max_bytes, None, original)  # fetch() bounds the time
                async for chunk in response.content.iter_chunked(_CHUNK):
                    body.add(chunk)
                return body.join(), None
        except FetchError:
            raise
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            reason = _describe(exc)
            raise failed(f"{original.shown}: the response broke off ({reason})", retriable=True) from None
        except aiohttp.InvalidURL as exc:
            raise failed(f"{original.shown}: cannot request it ({type(exc).__name__})") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientResponseError, OSError) as exc:
            reason = _describe(exc)
            raise failed(f"{original.shown}: connection failed ({reason})", retriable=True) from None
        except (ValueError, UnicodeError) as exc:
            raise failed(f"{original.shown}: cannot request it ({_describe(exc)})") from None

    def _redirect_target(self, current: Reference, original: Reference, location: str) -> Reference:
        target = urljoin(current.uri, location)
        try:
            return parse_reference(target, self._redirect_schemes)
        except FetchError:
            raise forbidden(f"{original.shown} redirects to a scheme that is not enabled") from None
        except Exception:
            raise failed(f"{original.shown} redirects to an invalid location") from None


def _url(reference: Reference) -> URL:
    """The reference without its userinfo (credentials go in a header, to their own origin only)."""
    host = f"[{reference.host}]" if ":" in reference.host else reference.host
    port = "" if reference.port == DEFAULT_PORTS[reference.scheme] else f":{reference.port}"
    return URL(f"{reference.scheme}://{host}{port}{reference.target}", encoded=True)


def _describe(exc: BaseException) -> str:
    """What went wrong, without the URL some of aiohttp's errors carry: its query may be a presigned
    URL's signature, and its userinfo a password."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__}: {exc.status}, {exc.message}"
    text = str(exc)
    return type(exc).__name__ if not text or "://" in text or "?" in text else text


def _credentials(current: Reference, original: Reference) -> dict[str, str] | None:
    # Basic credentials from the URI's userinfo go to its own origin only, never across a redirect.
    if original.username is None or current.origin != original.origin:
        return None
    pair = f"{original.username}:{original.password or ''}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}


def _status_error(status: int, shown: str, retry_after: str | None) -> FetchError:
    if status in (404, 410):
        return not_found(f"{shown}: HTTP {status}")
    if status in (401, 403):
        return forbidden(f"{shown}: the server refused access (HTTP {status})")
    if status in _RETRIABLE_STATUS or status >= 500:
        hint = float(retry_after) if retry_after and retry_after.isdigit() else None
        return failed(f"{shown}: HTTP {status}", retriable=True, retry_after_s=hint)
    return failed(f"{shown}: HTTP {status}")


def _header(headers: CIMultiDictProxy[str], name: str) -> str | None:
    value = headers.get(name)
    return value.strip() if value else None
