"""HTTP(S) fetching on the fetch loop: the SSRF guard's checked addresses handed to libcurl
(:mod:`worker.fetching.transfers`), one deadline per try, the body cut off at the byte limit as it
arrives, redirects followed here (limited, each hop's scheme and address checked again).

The protocol itself (framing, TLS, keep-alive) is libcurl's: docs/decisions/0001-http-client.md says why.
"""

from __future__ import annotations

import asyncio
import base64
import functools
from concurrent.futures import Executor
from urllib.parse import urljoin

import pycurl

from worker.fetching.body import over_the_limit
from worker.fetching.guard import AddressGuard, is_ip_address
from worker.fetching.outcomes import FetchError, failed, forbidden, not_found, timed_out
from worker.fetching.transfers import (
    E_TOO_LARGE,
    E_WEIRD_SERVER_REPLY,
    MAX_HEAD_BYTES,
    Answer,
    Request,
    TransferFailed,
    Transfers,
)
from worker.fetching.uri import DEFAULT_PORTS, Reference, parse_reference

MAX_REDIRECTS = 5
_ADDRESSES_REMEMBERED = 4096
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRIABLE_STATUS = frozenset({408, 425, 429})
_HEADERS = (
    "User-Agent: clip-worker",
    "Accept: image/*, */*;q=0.5",
    "Accept-Encoding: identity",  # images are compressed already
)
# Failures of the connection or of the answer's delivery: worth another try.
_BROKE_OFF = frozenset(
    {pycurl.E_RECV_ERROR, pycurl.E_SEND_ERROR, pycurl.E_GOT_NOTHING, pycurl.E_PARTIAL_FILE}
)
_NOT_HTTP = frozenset(
    {E_WEIRD_SERVER_REPLY, pycurl.E_UNSUPPORTED_PROTOCOL, pycurl.E_HTTP2, pycurl.E_BAD_CONTENT_ENCODING}
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
    ) -> None:
        self._guard = guard
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
        self._redirect_schemes = enabled & {"http", "https"}
        self._connections = connections
        self._lookups = lookups
        self._transfers: Transfers | None = None  # made on the loop, at the first fetch
        self._addresses_passed: set[str] = set()  # hosts written as IP addresses the guard let through

    async def fetch(self, reference: Reference) -> bytes:
        """One try: the body of ``reference`` after at most :data:`MAX_REDIRECTS` redirects, within one
        ``timeout_s`` deadline. Raises :class:`FetchError`."""
        current = reference
        try:
            async with asyncio.timeout(self._timeout_s):
                for _hop in range(MAX_REDIRECTS + 1):
                    answer = await self._get(current, reference)
                    if answer.status not in _REDIRECTS or not answer.location:
                        return answer_body(answer, reference)
                    current = self._redirect_target(current, reference, answer.location)
        except TimeoutError:
            raise timed_out(f"{reference.shown}: no answer within {self._timeout_s:g}s") from None
        raise failed(f"{reference.shown}: more than {MAX_REDIRECTS} redirects")

    async def close(self) -> None:
        """Stop the transfers under way and close the kept-alive connections."""
        if self._transfers is not None:
            await self._transfers.close()
            self._transfers = None

    async def _get(self, current: Reference, original: Reference) -> Answer:
        request = await self._request(current, original)
        if self._transfers is None:
            self._transfers = Transfers(self._connections)
        try:
            return await self._transfers.get(request)
        except TransferFailed as exc:
            raise self._failure(exc, original) from None

    async def _request(self, current: Reference, original: Reference) -> Request:
        """The GET for ``current``, pinned to the addresses the guard checked for its host."""
        host, port = current.host, current.port
        if host in self._addresses_passed or self._written_address(host):
            pinned = None
        else:
            loop = asyncio.get_running_loop()
            addresses = await loop.run_in_executor(self._lookups, self._guard.addresses, host, port)
            pinned = f"+{host}:{port}:" + ",".join(f"[{a}]" if ":" in a else a for a in addresses)
        headers = list(_HEADERS)
        # Basic credentials from the URI's userinfo go to its own origin only, never across a redirect.
        if original.username is not None and current.origin == original.origin:
            pair = f"{original.username}:{original.password or ''}".encode()
            headers.append("Authorization: Basic " + base64.b64encode(pair).decode("ascii"))
        return Request(
            url=_url_without_userinfo(current),
            headers=headers,
            permits=functools.partial(self._guard.permits, host),
            pinned=pinned,
            max_bytes=self._max_bytes,
            timeout_s=self._timeout_s,
        )

    def _written_address(self, host: str) -> bool:
        """Whether ``host`` is an IP address as written (then checked by the guard, as are 2130706433 or
        0x7f.1, which some layers take for addresses); a name is left to the lookup."""
        self._guard.check_written(host)
        if not is_ip_address(host):
            return False
        if len(self._addresses_passed) < _ADDRESSES_REMEMBERED:
            self._addresses_passed.add(host)
        return True

    def _failure(self, exc: TransferFailed, original: Reference) -> FetchError:
        """The typed rejection for a transfer that brought no answer."""
        shown, code = original.shown, exc.code
        if code == pycurl.E_FILESIZE_EXCEEDED:
            return over_the_limit(original, self._max_bytes, exc.declared)
        if exc.head_too_large or code == E_TOO_LARGE:
            return failed(f"{shown}: the answer has headers over {MAX_HEAD_BYTES} bytes")
        if exc.status == 101:
            return failed(f"{shown}: the server switched protocols unasked")
        if code == pycurl.E_OPERATION_TIMEDOUT:
            return timed_out(f"{shown}: no answer within {self._timeout_s:g}s")
        if code == pycurl.E_PEER_FAILED_VERIFICATION:
            return failed(f"{shown}: certificate check failed ({exc})")
        if code in _NOT_HTTP:
            return failed(f"{shown}: the answer is not valid HTTP ({exc})")
        if code in _BROKE_OFF:
            return failed(f"{shown}: the response broke off ({exc})", retriable=True)
        if code in (pycurl.E_COULDNT_CONNECT, pycurl.E_SSL_CONNECT_ERROR):
            return failed(f"{shown}: connection failed ({exc})", retriable=True)
        return failed(f"{shown}: {exc}")

    def _redirect_target(self, current: Reference, original: Reference, location: str) -> Reference:
        target = urljoin(current.uri, location)
        try:
            return parse_reference(target, self._redirect_schemes)
        except FetchError:
            raise forbidden(f"{original.shown} redirects to a scheme that is not enabled") from None
        except Exception:
            raise failed(f"{original.shown} redirects to an invalid location") from None


def _url_without_userinfo(reference: Reference) -> str:
    """The URL libcurl is given: credentials travel in a header this module decides on, never in it."""
    host = f"[{reference.host}]" if ":" in reference.host else reference.host
    if reference.port != DEFAULT_PORTS[reference.scheme]:
        host += f":{reference.port}"
    return f"{reference.scheme}://{host}{reference.target}"


def answer_body(answer: Answer, reference: Reference) -> bytes:
    """The body of a 2xx answer; any other status as its typed :class:`FetchError`."""
    status = answer.status
    if 200 <= status < 300:
        return answer.body
    if status in (404, 410):
        raise not_found(f"{reference.shown}: HTTP {status}")
    if status in (401, 403):
        raise forbidden(f"{reference.shown}: the server refused access (HTTP {status})")
    if status in _RETRIABLE_STATUS or status >= 500:
        retry_after = answer.retry_after
        hint = float(retry_after) if retry_after and retry_after.isascii() and retry_after.isdigit() else None
        raise failed(f"{reference.shown}: HTTP {status}", retriable=True, retry_after_s=hint)
    raise failed(f"{reference.shown}: HTTP {status}")
