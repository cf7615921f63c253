"""The SSRF guard: which network addresses a reference may reach.

Every address a host name resolves to is checked, and the connection is then made to one of those
checked addresses (the HTTP client connects to nothing else), never to a second lookup's answer: a name
that resolves to a public address for the check and to 127.0.0.1 for the connection (DNS rebinding) gets
nowhere. Redirects open new connections, so each hop is checked the same way.

Refused unless opened: loopback, private (RFC 1918, unique local), link-local, the cloud metadata
services, unspecified, multicast, reserved and every other non-global range. An IPv6 address that embeds
an IPv4 address is refused if any IPv4 address it embeds is, for that address's reason: IPv4-mapped
(``::ffff:127.0.0.1``), IPv4-compatible (``::127.0.0.1``), NAT64 (``64:ff9b::/96`` and the local-use
``64:ff9b:1::/48``), 6to4 (``2002::/16``) and Teredo (``2001::/32``, its server and its client). The
IPv4-mapped and well-known NAT64 forms stand for their IPv4 address and are otherwise judged as it is;
the others are refused whatever they embed (tunnels and local-use translation: not globally routable).
``--fetch-allow-private`` opens the non-global ranges except the metadata services, in whatever form
they are written; ``--fetch-allow-hosts`` opens named hosts (whatever they resolve to) and address ranges
(CIDR), which match an address or the IPv4 addresses it embeds, the metadata services included if named.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any

from worker.fetching.outcomes import FetchError, failed, forbidden

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
# RFC 6052's well-known NAT64 prefix is globally reachable: a packet to it goes to the IPv4 address inside.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# RFC 8215's local-use NAT64 prefix: the operator picks the prefix length (/48 to /96) inside it, so where
# the IPv4 address sits is not known here, and what its translator reaches is the operator's network.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # RFC 4291, deprecated; :: and ::1 are not IPv4
# Tunnels (6to4, Teredo) and local-use translation reach whatever relay or translator routing picks, not
# the host named; IANA lists neither as globally reachable. Refused even when what they embed is public.
_NOT_GLOBAL_WRAPPERS = (ipaddress.ip_network("2002::/16"), ipaddress.ip_network("2001::/32"), _LOCAL_NAT64)
# RFC 6052 section 2.2 layouts that fit inside a /48, as (prefix length, bits 88-127 that must be zero):
# the IPv4 address follows the prefix, skipping bits 64-71 (the u-octet), and a zero suffix follows it.
_LOCAL_NAT64_LAYOUTS = ((48, (1 << 40) - 1), (56, (1 << 32) - 1), (64, (1 << 24) - 1), (96, 0))


def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's answer for ``host`` (A and AAAA), in its preferred order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def embedded_ipv4(address: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address embeds (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo's
    server and client), none for any other address.

    For the local-use NAT64 prefix, the IPv4 address as the first RFC 6052 layout whose suffix is zero
    reads it, and every other layout's reading that is a metadata service."""
    if not isinstance(address, ipaddress.IPv6Address):
        return ()
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address.teredo is not None:
        return address.teredo
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    if address in _LOCAL_NAT64:
        return _local_nat64_ipv4(address)
    return ()


def _local_nat64_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    value = int(address)
    # Bits 0-63 and 72-127 side by side (120 bits): the IPv4 address then follows the prefix unbroken.
    joined = (value >> 64) << 56 | (value & ((1 << 56) - 1))
    readings: list[tuple[ipaddress.IPv4Address, bool]] = []
    for length, suffix in _LOCAL_NAT64_LAYOUTS:
        start = length if length <= 64 else length - 8
        readings.append((ipaddress.IPv4Address((joined >> (88 - start)) & 0xFFFFFFFF), (value & suffix) == 0))
    first = next(ipv4 for ipv4, zero_suffix in readings if zero_suffix)  # the /96 layout has no suffix
    # Whichever layout the operator picked, a metadata service must not be opened by --fetch-allow-private.
    return (first, *(ipv4 for ipv4, _ in readings if ipv4 in METADATA_ADDRESSES and ipv4 != first))


def classify(address: IPAddress) -> str | None:
    """Why ``address`` is refused by default (``loopback``, ``private``...), or None for a public one.

    An IPv6 address that embeds IPv4 addresses is refused for the first reason one of them is refused for
    (``metadata service`` before any other)."""
    embedded = embedded_ipv4(address)
    if address in METADATA_ADDRESSES or any(ipv4 in METADATA_ADDRESSES for ipv4 in embedded):
        return "metadata service"
    for ipv4 in embedded:
        problem = _range_problem(ipv4)
        if problem is not None:
            return problem
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None or address in _NAT64:
            return None
        if any(address in network for network in _NOT_GLOBAL_WRAPPERS):
            return "not globally routable"
    return _range_problem(address)


def _range_problem(address: IPAddress) -> str | None:
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

    def permits(self, host: str, address: str) -> bool:
        """Whether a connection for ``host`` may go to ``address`` (what :meth:`addresses` would have
        passed, without a lookup): the check at the socket, whatever address it is about to reach."""
        if host.lower().strip("[]") in self._names:
            return True
        try:
            self._check(host, address)
        except (FetchError, ValueError):
            return False
        return True

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
        embedded = embedded_ipv4(address)
        inside = f" (it embeds {' and '.join(map(str, embedded))})" if embedded else ""
        raise forbidden(
            f"{shown} is a {problem} address{inside}; --fetch-allow-hosts"
            + ("" if problem == "metadata service" else " or --fetch-allow-private")
            + " opens it"
        )

    def _opened(self, address: IPAddress, problem: str) -> bool:
        if self._listed(address):
            return True
        # Through what it embeds: every refused IPv4 address inside must be listed (Teredo's two), and one
        # at least (a tunnel that embeds only public addresses is refused for its own range).
        embedded = embedded_ipv4(address)
        if any(self._listed(ipv4) for ipv4 in embedded) and all(
            self._listed(ipv4) or classify(ipv4) is None for ipv4 in embedded
        ):
            return True
        return self._allow_private and problem != "metadata service"

    def _listed(self, address: IPAddress) -> bool:
        return any(address in network for network in self._networks)


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
