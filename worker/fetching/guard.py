"""The SSRF guard: which network addresses a reference may reach.

Every address a host name resolves to is checked, and the connection is then made to one of those
checked addresses (:mod:`worker.fetching.http_pool` connects to nothing else), never to a second
lookup's answer: a name that resolves to a public address for the check and to 127.0.0.1 for the
connection (DNS rebinding) gets nowhere. Redirects
open new connections, so each hop is checked the same way.

Refused unless opened: loopback, private (RFC 1918, unique local), link-local, the cloud metadata
services, unspecified, multicast, reserved and every other non-global range, including IPv4 addresses
wrapped in IPv6 (``::ffff:127.0.0.1``, NAT64 ``64:ff9b::/96``). ``--fetch-allow-private`` opens the
non-global ranges except the metadata services; ``--fetch-allow-hosts`` opens named hosts (whatever they
resolve to) and address ranges (CIDR), the metadata services included if named.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any

from worker.fetching.outcomes import failed, forbidden

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]
"""Host name and port to the IP addresses (as strings) a connection may go to."""

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean...
        "169.254.170.2",  # AWS ECS task credentials
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's answer for ``host`` (A and AAAA), in its preferred order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def unwrap(address: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped or NAT64 IPv6 address, else ``address`` itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def classify(address: IPAddress) -> str | None:
    """Why ``address`` is refused by default (``loopback``, ``private``...), or None for a public one."""
    address = unwrap(address)
    if address in METADATA_ADDRESSES:
        return "metadata service"
    for label, test in (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
    ):
        if test:
            return label
    return None if address.is_global else "not globally routable"


def parse_allow_entries(entries: Iterable[str]) -> tuple[frozenset[str], tuple[Any, ...]]:
    """Split ``--fetch-allow-hosts`` entries into host names and address networks; raises ValueError
    naming an entry that is neither."""
    names: set[str] = set()
    networks: list[Any] = []
    for raw in entries:
        entry = raw.strip().lower().strip("[]")
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        if not all(part and len(part) <= 63 for part in entry.split(".")) or not set(entry) <= set(
            "abcdefghijklmnopqrstuvwxyz0123456789-._"
        ):
            raise ValueError(f"{raw!r} is neither a host name nor an IP address or CIDR range")
        names.add(entry)
    return frozenset(names), tuple(networks)


class AddressGuard:
    """Resolves host names and refuses the addresses the policy does not open."""

    def __init__(
        self,
        allow_hosts: Iterable[str] = (),
        allow_private: bool = False,
        resolver: Resolver = system_resolver,
    ) -> None:
        self._names, self._networks = parse_allow_entries(allow_hosts)
        self._allow_private = allow_private
        self._resolver = resolver

    def addresses(self, host: str, port: int) -> list[str]:
        """The checked addresses to connect to for ``host``; raises
        :class:`~worker.fetching.outcomes.FetchError` (``fetch_forbidden`` when one is refused)."""
        host = host.lower().strip("[]")
        try:
            resolved = self._resolver(host, port)
        except socket.gaierror as exc:
            # A temporary failure of the resolver is worth another try; an unknown name is not.
            retriable = exc.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None))
            raise failed(f"cannot resolve {host}: {exc.strerror or exc}", retriable=retriable) from None
        except (OSError, UnicodeError) as exc:
            raise failed(f"cannot resolve {host}: {exc}") from None
        if not resolved:
            raise failed(f"cannot resolve {host}: no addresses")
        if host not in self._names:
            for text in resolved:
                self._check(host, text)
        return resolved

    def check_written(self, host: str) -> None:
        """Refuse ``host`` if it is an IP address written out in the URI (which the HTTP client connects
        to without a lookup) that the policy does not open; a name is left to :meth:`addresses`."""
        text = host.lower().strip("[]")
        if is_ip_address(text):
            self._check(text, text)
            return
        # Not an address as written; but 2130706433, 127.1, 0x7f.1 or 0177.0.0.1 reach 127.0.0.1 through
        # the socket layer, and an HTTP client may take any run of digits and dots for an address and
        # never ask the resolver.
        numeric = _ipv4_as_the_socket_layer_reads(text)
        if numeric is not None:
            self._check(text, numeric)

    def _check(self, host: str, text: str) -> None:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone
        problem = classify(address)
        if problem is None or self._opened(address, problem):
            return
        shown = host if host == text else f"{host} resolves to {text}, which"
        raise forbidden(
            f"{shown} is a {problem} address; --fetch-allow-hosts"
            + ("" if problem == "metadata service" else " or --fetch-allow-private")
            + " opens it"
        )

    def _opened(self, address: IPAddress, problem: str) -> bool:
        if any(unwrap(address) in net or address in net for net in self._networks):
            return True
        return self._allow_private and problem != "metadata service"


def is_ip_address(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address as written (an IPv6 zone allowed, no brackets)."""
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _ipv4_as_the_socket_layer_reads(host: str) -> str | None:
    """The IPv4 address ``inet_aton`` makes of ``host`` (decimal, octal, hex, fewer than four parts, a
    trailing dot), or None for a name."""
    try:
        return socket.inet_ntoa(socket.inet_aton(host.rstrip(".")))
    except (OSError, UnicodeError, ValueError):
        return None
