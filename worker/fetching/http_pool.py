"""Kept-alive HTTP connections per origin, each opened only to an address the SSRF guard checked.

A host name is looked up once per new connection (on the lookup threads: the system resolver blocks), the
guard checks every address it returns, and the socket connects to one of those very addresses, never to
a second lookup's answer (DNS rebinding). TLS still verifies the certificate against the host name, which
is also what SNI sends. An IP address written in the URI is checked as written, with no lookup.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from contextlib import asynccontextmanager

from worker.fetching.guard import AddressGuard, is_ip_address
from worker.fetching.http_connection import HttpConnection

Origin = tuple[str, str, int]
"""Scheme, host and port: the connections of one origin are interchangeable."""


class ConnectionPool:
    """At most ``limit`` connections in use at once; idle ones are kept for ``keepalive_s`` seconds
    (``limit`` of them at most) and reused newest first. Used from the fetch loop only."""

    def __init__(
        self,
        guard: AddressGuard,
        lookups: Executor,
        ssl_context: ssl.SSLContext,
        limit: int,
        keepalive_s: float = 30.0,
    ) -> None:
        self._guard = guard
        self._lookups = lookups
        self._ssl_context = ssl_context
        self._limit = limit
        self._keepalive_s = keepalive_s
        self._slots = asyncio.Semaphore(limit)
        self._idle: dict[Origin, list[tuple[float, HttpConnection]]] = {}
        self._idle_count = 0
        self._in_use: set[HttpConnection] = set()

    @asynccontextmanager
    async def connection(self, origin: Origin, fresh: bool = False) -> AsyncIterator[HttpConnection]:
        """A connection to ``origin`` (a kept-alive one unless ``fresh``), back in the pool afterwards if
        its last answer left it reusable, closed otherwise. Raises the guard's
        :class:`~worker.fetching.outcomes.FetchError` and the socket's or TLS's ``OSError``."""
        async with self._slots:
            connection = None if fresh else self._take_idle(origin)
            if connection is None:
                connection = await self._open(origin)
            self._in_use.add(connection)
            try:
                yield connection
            finally:
                self._in_use.discard(connection)
                self._give_back(origin, connection)

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        for connections in self._idle.values():
            for _since, connection in connections:
                connection.close()
        self._idle.clear()
        self._idle_count = 0
        for connection in list(self._in_use):
            connection.close()

    def _usable(self, since: float, connection: HttpConnection, now: float) -> bool:
        """Whether an idle connection may still serve: open, and not kept past ``keepalive_s``."""
        return connection.reusable and now - since < self._keepalive_s

    def _take_idle(self, origin: Origin) -> HttpConnection | None:
        connections = self._idle.get(origin)
        now = time.monotonic()
        found = None
        while connections and found is None:
            since, connection = connections.pop()
            self._idle_count -= 1
            if self._usable(since, connection, now):
                found = connection
            else:
                connection.close()
        if connections is not None and not connections:
            del self._idle[origin]
        return found

    def _give_back(self, origin: Origin, connection: HttpConnection) -> None:
        if not connection.reusable:
            connection.close()
            return
        if self._idle_count >= self._limit:
            self._make_room()
        self._idle.setdefault(origin, []).append((time.monotonic(), connection))
        self._idle_count += 1

    def _make_room(self) -> None:
        """Close the idle connections that can no longer serve (closed by their server, or kept too
        long), else the oldest one: the newest are the likeliest to be asked for again."""
        now = time.monotonic()
        for origin, connections in list(self._idle.items()):
            kept = []
            for since, connection in connections:
                if self._usable(since, connection, now):
                    kept.append((since, connection))
                else:
                    connection.close()
            self._idle_count -= len(connections) - len(kept)
            if kept:
                self._idle[origin] = kept
            else:
                del self._idle[origin]
        if self._idle_count >= self._limit:
            origin = min(self._idle, key=lambda each: self._idle[each][0][0])  # each list oldest first
            _since, oldest = self._idle[origin].pop(0)
            oldest.close()
            self._idle_count -= 1
            if not self._idle[origin]:
                del self._idle[origin]

    async def _open(self, origin: Origin) -> HttpConnection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        self._guard.check_written(host)  # also 2130706433 or 0x7f.1, which some layers take for addresses
        if is_ip_address(host):
            addresses = [host]
        else:
            addresses = await loop.run_in_executor(self._lookups, self._guard.addresses, host, port)
        tls = self._ssl_context if scheme == "https" else None
        failure: OSError | None = None
        for address in addresses:  # in the resolver's order of preference; the first that answers
            try:
                _transport, connection = await loop.create_connection(
                    HttpConnection,
                    address,
                    port,
                    ssl=tls,
                    server_hostname=host if tls else None,
                    flags=socket.AI_NUMERICHOST,  # the checked address as it is: never a lookup
                )
            except OSError as exc:
                failure = exc
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise
                continue
            return connection
        assert failure is not None  # the guard never answers with no address
        raise failure
