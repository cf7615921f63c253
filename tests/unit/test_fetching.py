"""Images by reference: the fetchers against real servers on loopback (a local HTTP origin, moto's S3
server), the SSRF guard, the file root, retries, limits, and what errors may show."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import time
from collections.abc import Iterator
from ipaddress import IPv6Address, ip_address
from pathlib import Path

import pycurl
import pytest
from prometheus_client import generate_latest

from tests.support.object_store import S3_ENV, ObjectStore, object_store
from tests.support.tls import make_tls
from worker.devtools.origin import ImageOrigin
from worker.errors import RejectedRecord, RejectReason
from worker.fetching.fetcher import Fetcher, FetchPolicy
from worker.fetching.guard import AddressGuard, classify, embedded_ipv4, system_resolver
from worker.fetching.http import answer_body
from worker.fetching.outcomes import FetchError
from worker.fetching.retry import RetryPolicy, with_retries
from worker.fetching.transfers import Answer, Request, TransferFailed, Transfers
from worker.fetching.uri import parse_reference, redact
from worker.ops.metrics import WorkerMetrics

BODY = bytes(range(256)) * 40  # 10 KiB
FAST = RetryPolicy(base_delay_s=0.01, max_delay_s=0.02)
HTTP = frozenset({"http", "https"})


@pytest.fixture
def origin() -> Iterator[ImageOrigin]:
    with ImageOrigin() as server:
        server.put("cat", BODY)
        yield server


@pytest.fixture(scope="module")
def store() -> Iterator[ObjectStore]:
    with object_store() as running:
        yield running


_made: list[Fetcher] = []


@pytest.fixture(autouse=True)
def _close_fetchers() -> Iterator[None]:
    yield
    while _made:
        _made.pop().close()


def make(
    *,
    schemes: frozenset[str] = HTTP,
    allow: tuple[str, ...] = ("127.0.0.1",),
    metrics: WorkerMetrics | None = None,
    resolver=system_resolver,
    **policy,
) -> Fetcher:
    policy.setdefault("timeout_s", 2.0)
    policy.setdefault("retries", 2)
    fetcher = Fetcher(
        FetchPolicy(schemes=schemes, allow_hosts=allow, backoff=FAST, **policy),
        metrics or WorkerMetrics(),
        resolver=resolver,
    )
    _made.append(fetcher)
    return fetcher


def reason_of(fetcher: Fetcher, uri: str) -> RejectReason:
    with pytest.raises(RejectedRecord) as caught:
        fetcher.fetch_blocking(uri)
    return caught.value.reason


def sample(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --- URIs -------------------------------------------------------------------------------------------


def test_http_references_keep_host_port_target_and_userinfo():
    ref = parse_reference("https://u%40x:p%3Aw@Images.Example.com:8443/a/b.jpg?sig=1#frag", HTTP)
    assert (ref.scheme, ref.host, ref.port, ref.target) == (
        "https",
        "images.example.com",
        8443,
        "/a/b.jpg?sig=1",
    )
    assert (ref.username, ref.password) == ("u@x", "p:w")
    assert parse_reference("http://[::1]/x", HTTP).host == "::1"
    assert parse_reference("http://h", HTTP).target == "/"


def test_s3_and_file_references():
    s3 = parse_reference("s3://my-bucket/photos/2024/a b%20c é.jpg", {"s3"})
    assert (s3.host, s3.target) == ("my-bucket", "photos/2024/a b%20c é.jpg"), "S3 keys are verbatim"
    assert parse_reference("file:///data/a%20b.jpg", {"file"}).target == "/data/a b.jpg"


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("", RejectReason.INVALID_ENVELOPE),
        ("http://", RejectReason.INVALID_ENVELOPE),
        ("http://h:99999/x", RejectReason.INVALID_ENVELOPE),
        ("http://h/a b", RejectReason.INVALID_ENVELOPE),
        ("http://h/é", RejectReason.INVALID_ENVELOPE),
        ("s3://bucket/a\nb", RejectReason.INVALID_ENVELOPE),
        ("http://h/\r\nHost: evil", RejectReason.INVALID_ENVELOPE),
        ("http://loc%61lhost/x.jpg", RejectReason.INVALID_ENVELOPE),  # looked up one way, reached another
        ("http://[fe80::1%25eth0]/x.jpg", RejectReason.INVALID_ENVELOPE),
        ("s3://Bad_Bucket/key", RejectReason.INVALID_ENVELOPE),
        ("s3://bucket", RejectReason.INVALID_ENVELOPE),
        ("file://server/share/x.jpg", RejectReason.INVALID_ENVELOPE),
        ("ftp://h/x.jpg", RejectReason.FETCH_FORBIDDEN),
        ("gopher://h/x", RejectReason.FETCH_FORBIDDEN),
        ("no-scheme-at-all", RejectReason.FETCH_FORBIDDEN),
    ],
)
def test_bad_references_are_typed(uri, reason):
    with pytest.raises(RejectedRecord) as caught:
        parse_reference(uri, {"http", "https", "s3", "file"})
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    "uri", ["http://example.com:0/a.jpg", "https://example.com:00/a.jpg", "http://[::1]:0/"]
)
def test_port_0_is_refused_not_taken_for_the_default(uri):
    with pytest.raises(RejectedRecord, match=r"has an invalid port \(0\)") as caught:
        parse_reference(uri, HTTP)
    assert caught.value.reason == RejectReason.INVALID_ENVELOPE


def test_an_empty_port_is_the_default_one():
    # RFC 3986 section 3.2.3: a port that is empty after the colon is the scheme's default.
    assert parse_reference("http://example.com:/a.jpg", HTTP).port == 80
    assert parse_reference("https://[2606:4700::1]:/a.jpg", HTTP).port == 443


@pytest.mark.parametrize("uri", ["file:///etc/passwd", "s3://bucket/key", "https://h/x"])
def test_schemes_not_enabled_are_forbidden(uri):
    with pytest.raises(RejectedRecord) as caught:
        parse_reference(uri, {"http"})
    assert caught.value.reason == RejectReason.FETCH_FORBIDDEN


def test_redaction_hides_userinfo_and_query_values():
    shown = redact("https://AKIA:s3cr3t@host/k.jpg?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA%2F1&tok#f")
    assert shown == "https://***@host/k.jpg?X-Amz-Signature=***&X-Amz-Credential=***&***"
    assert redact("s3://bucket/key") == "s3://bucket/key"


# --- SSRF guard --------------------------------------------------------------------------------------


def teredo(server: str, client: str) -> str:
    """A Teredo address (2001::/32): the server's IPv4 address in bits 32-64, the client's in the last 32
    bits with every bit flipped (flags and port left zero)."""
    prefix = 0x2001_0000 << 96
    return str(IPv6Address(prefix | int(ip_address(server)) << 64 | int(ip_address(client)) ^ 0xFFFF_FFFF))


@pytest.mark.parametrize(
    ("address", "label"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("64:ff9b::7f00:1", "loopback"),
        ("169.254.169.254", "metadata service"),
        ("::ffff:169.254.169.254", "metadata service"),
        # Every IPv6 form that embeds an IPv4 address is refused for what it embeds.
        ("2002:7f00:1::", "loopback"),  # 6to4 (bits 16-48): 127.0.0.1
        ("2002:7f00:1:1234:5678::1", "loopback"),  # whatever follows it
        ("2002:a00:1::", "private"),  # 10.0.0.1
        ("2002:a9fe:a9fe::", "metadata service"),
        ("::127.0.0.1", "loopback"),  # IPv4-compatible (::/96)
        ("::7f00:1", "loopback"),  # the same, written in hex
        ("::10.0.0.1", "private"),
        ("::169.254.169.254", "metadata service"),
        ("64:ff9b::a9fe:a9fe", "metadata service"),  # NAT64, the well-known prefix
        ("64:ff9b::a00:1", "private"),
        ("64:ff9b:1:7f00:0:100::", "loopback"),  # local-use NAT64, RFC 6052's /48 layout: 127.0.0.1
        ("64:ff9b:1::7f00:1", "loopback"),  # a /96 inside it: the last 32 bits
        ("64:ff9b:1:a9fe:a9:fe00::", "metadata service"),
        ("64:ff9b:1::a9fe:a9fe", "metadata service"),
        ("64:ff9b:1:a9fe:a9:fe00:0:1", "metadata service"),  # the /48 layout with a suffix: still refused
        (teredo("127.0.0.1", "8.8.8.8"), "loopback"),  # the server
        (teredo("8.8.8.8", "127.0.0.1"), "loopback"),  # the client
        (teredo("8.8.8.8", "10.0.0.1"), "private"),
        (teredo("127.0.0.1", "169.254.169.254"), "metadata service"),  # before any other reason
        (teredo("169.254.169.254", "8.8.8.8"), "metadata service"),
        ("fd00:ec2::254", "metadata service"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not globally routable"),
        ("93.184.216.34", None),
        ("2606:4700::1", None),
    ],
)
def test_address_classes(address, label):
    assert classify(ip_address(address)) == label


def test_teredo_addresses_are_built_as_the_standard_has_them():
    address = IPv6Address(teredo("127.0.0.1", "10.0.0.1"))
    assert str(address) == "2001:0:7f00:1::f5ff:fffe", "the client 10.0.0.1 is stored as 0xf5fffffe"
    assert address.teredo == (ip_address("127.0.0.1"), ip_address("10.0.0.1"))
    assert int(ip_address(teredo("8.8.8.8", "127.0.0.1"))) & 0xFFFF_FFFF == 0x80FF_FFFE


@pytest.mark.parametrize(
    ("address", "embedded"),
    [
        ("::ffff:127.0.0.1", ["127.0.0.1"]),
        ("::7f00:1", ["127.0.0.1"]),
        ("64:ff9b::7f00:1", ["127.0.0.1"]),
        ("2002:c000:204:1::5", ["192.0.2.4"]),
        (teredo("192.0.2.1", "198.51.100.7"), ["192.0.2.1", "198.51.100.7"]),
        ("64:ff9b:1:c000:2:400::", ["192.0.2.4"]),  # /48: bits 48-64 and 72-88 (64-72 is the u-octet)
        ("64:ff9b:1:0:c0:2:400::", ["192.0.2.4"]),  # /64: bits 72-104
        ("64:ff9b:1:1::c000:204", ["192.0.2.4"]),  # /96: the last 32 bits
        ("64:ff9b:1:a9fe:a9:fe00:0:1", ["0.0.0.1", "169.254.169.254"]),  # the /96 reading, and metadata
        ("::", []),
        ("::1", []),
        ("2606:4700::1", []),
        ("127.0.0.1", []),
    ],
)
def test_the_ipv4_addresses_an_ipv6_address_embeds(address, embedded):
    assert [str(ipv4) for ipv4 in embedded_ipv4(ip_address(address))] == embedded


@pytest.mark.parametrize(
    ("address", "label"),
    [
        # IPv4-mapped and the well-known NAT64 prefix stand for the IPv4 address itself (IANA: NAT64's
        # 64:ff9b::/96 is globally reachable), so a public one is as public as 8.8.8.8.
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),
        # 6to4 and Teredo are tunnels: what answers is whatever relay routing picks, not 8.8.8.8, and IANA
        # lists neither 2002::/16 nor 2001::/32 as globally reachable. Python 3.11 calls 2002:808:808::
        # global and later versions do not; the guard refuses it on any version.
        ("2002:808:808::", "not globally routable"),
        (teredo("8.8.8.8", "9.9.9.9"), "not globally routable"),
        # The local-use NAT64 prefix reaches the operator's translator, wherever its prefix length puts
        # the IPv4 address.
        ("64:ff9b:1::808:808", "not globally routable"),
        ("64:ff9b:1:808:8:800::", "not globally routable"),
        # IPv4-compatible addresses are deprecated (RFC 4291) and lie in the reserved ::/8.
        ("::8.8.8.8", "reserved"),
    ],
)
def test_a_public_ipv4_address_embedded_in_a_tunnel_is_still_refused(address, label):
    assert classify(ip_address(address)) == label


def test_an_ipv6_literal_that_embeds_loopback_is_refused_as_written():
    reference = parse_reference("http://[2002:7f00:1::]/a.jpg", HTTP)
    with pytest.raises(FetchError, match=r"loopback address \(it embeds 127\.0\.0\.1\)") as caught:
        AddressGuard().check_written(reference.host)
    assert caught.value.reason == RejectReason.FETCH_FORBIDDEN
    for uri in ("http://[::127.0.0.1]/a.jpg", f"http://[{teredo('8.8.8.8', '127.0.0.1')}]/a.jpg"):
        with pytest.raises(FetchError):
            AddressGuard().check_written(parse_reference(uri, HTTP).host)


def test_allow_options_match_the_ipv4_addresses_an_address_embeds():
    def guard(*allow: str, private: bool = False) -> AddressGuard:
        return AddressGuard(allow, allow_private=private, resolver=lambda host, port: [host])

    def opened(checked: AddressGuard, address: str) -> bool:
        try:
            checked.check_written(address)
        except FetchError:
            return False
        return True

    assert opened(guard("127.0.0.0/8"), "2002:7f00:1::")
    assert opened(guard("2002::/16"), "2002:7f00:1::"), "or the IPv6 range itself"
    assert opened(guard("8.8.8.8"), "2002:808:808::")
    assert opened(guard("127.0.0.0/8"), teredo("127.0.0.1", "8.8.8.8"))
    assert not opened(guard("127.0.0.0/8"), teredo("127.0.0.1", "10.0.0.1")), "both must be opened"
    assert opened(guard("127.0.0.0/8", "10.0.0.0/8"), teredo("127.0.0.1", "10.0.0.1"))
    assert not opened(guard("10.0.0.0/8"), "2002:7f00:1::")
    # --fetch-allow-private opens what is not global, but a metadata service in no form.
    assert opened(guard(private=True), "2002:7f00:1::")
    assert opened(guard(private=True), teredo("8.8.8.8", "10.0.0.1"))
    assert opened(guard(private=True), "64:ff9b:1::808:808")
    for metadata in (
        "2002:a9fe:a9fe::",
        "::169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1:a9fe:a9:fe00:0:1",
        teredo("127.0.0.1", "169.254.169.254"),
    ):
        assert not opened(guard(private=True), metadata), metadata
        assert not opened(guard("0.0.0.1/32", private=True), metadata), metadata
    assert opened(guard("169.254.169.254/32"), "2002:a9fe:a9fe::"), "opened when named"
    assert not opened(guard("127.0.0.0/8"), teredo("127.0.0.1", "169.254.169.254"))


def test_allow_private_opens_private_ranges_but_not_the_metadata_service():
    guard = AddressGuard(allow_private=True, resolver=lambda host, port: [host])
    assert guard.addresses("10.0.0.1", 80) == ["10.0.0.1"]
    assert guard.addresses("127.0.0.1", 80) == ["127.0.0.1"]
    with pytest.raises(FetchError) as caught:
        guard.addresses("169.254.169.254", 80)
    assert caught.value.reason == RejectReason.FETCH_FORBIDDEN
    opened = AddressGuard(["169.254.169.254/32"], resolver=lambda host, port: [host])
    assert opened.addresses("169.254.169.254", 80) == ["169.254.169.254"]


def test_a_name_is_refused_if_any_of_its_addresses_is():
    guard = AddressGuard(resolver=lambda host, port: ["93.184.216.34", "10.1.2.3"])
    with pytest.raises(FetchError, match=r"resolves to 10\.1\.2\.3"):
        guard.addresses("mixed.example.test", 443)


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:{port}/o/cat",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://10.0.0.1/x.jpg",
        "http://[::1]:{port}/o/cat",
        "http://[::ffff:127.0.0.1]:{port}/o/cat",
        "http://[2002:7f00:1::]:{port}/o/cat",  # 6to4
        "http://[::127.0.0.1]:{port}/o/cat",  # IPv4-compatible
        "http://[64:ff9b::7f00:1]:{port}/o/cat",  # NAT64
        f"http://[{teredo('8.8.8.8', '127.0.0.1')}]:{{port}}/o/cat",  # Teredo
        "http://localhost:{port}/o/cat",
        "http://0.0.0.0:{port}/o/cat",
        # 127.0.0.1 as the socket layer also reads it: decimal, short, octal, hex, a trailing dot
        "http://2130706433:{port}/o/cat",
        "http://127.1:{port}/o/cat",
        "http://0177.0.0.1:{port}/o/cat",
        "http://0x7f.1:{port}/o/cat",
        "http://127.0.0.1.:{port}/o/cat",
    ],
)
def test_ssrf_targets_are_refused_without_a_connection(origin, uri):
    fetcher = make(allow=())
    assert reason_of(fetcher, uri.format(port=origin.port)) == RejectReason.FETCH_FORBIDDEN
    assert origin.connections == 0


def test_allow_options_open_loopback_deliberately(origin):
    assert make(allow=(), allow_private=True).fetch_blocking(origin.url("/o/cat")) == BODY
    assert make(allow=("127.0.0.0/8",)).fetch_blocking(origin.url("/o/cat")) == BODY
    assert make(allow=("localhost",)).fetch_blocking(f"http://localhost:{origin.port}/o/cat") == BODY


def test_a_public_looking_host_that_redirects_to_loopback_is_refused(origin):
    # The resolver stands in for DNS: cdn.example.test is opened as if it were a public host (it is the
    # local origin); its redirects to loopback and the metadata service must still be refused.
    names = {"cdn.example.test": ["127.0.0.1"], "localhost": ["127.0.0.1"]}
    fetcher = make(allow=("cdn.example.test",), resolver=lambda host, port: names.get(host, [host]))
    public = f"http://cdn.example.test:{origin.port}"
    assert fetcher.fetch_blocking(f"{public}/o/cat") == BODY, "the opened host itself is served"
    for target in (
        f"http://localhost:{origin.port}/o/cat",
        f"http://127.0.0.1:{origin.port}/o/cat",
        "http://169.254.169.254/latest/meta-data/",
        f"http://[::1]:{origin.port}/o/cat",
    ):
        assert reason_of(fetcher, f"{public}/redirect?to={target}") == RejectReason.FETCH_FORBIDDEN
    assert origin.requests["/o/cat"] == 1, "no redirect target was ever requested"


def test_the_connection_goes_to_the_address_the_guard_checked(origin):
    # images.example.test cannot resolve through the system (.test is reserved): the fetch only works if
    # the socket connects to the guard's own answer, never to a second lookup (DNS rebinding).
    seen: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        seen.append(host)
        return ["127.0.0.1"]

    fetcher = make(allow=("127.0.0.1/32",), resolver=resolver)
    assert fetcher.fetch_blocking(f"http://images.example.test:{origin.port}/o/cat") == BODY
    assert seen == ["images.example.test"]


def test_redirects_to_schemes_not_enabled_are_refused(origin, tmp_path):
    (tmp_path / "x").write_bytes(b"x")
    fetcher = make(schemes=frozenset({"http", "file"}), file_root=tmp_path)
    for target in (f"file://{tmp_path}/x", "s3://bucket/key", "ftp://h/x"):
        assert reason_of(fetcher, origin.url(f"/redirect?to={target}")) == RejectReason.FETCH_FORBIDDEN


# --- HTTP -------------------------------------------------------------------------------------------


def test_fetches_reuse_one_connection_and_are_counted(origin):
    metrics = WorkerMetrics()
    fetcher = make(metrics=metrics)
    for _ in range(20):
        assert fetcher.fetch_blocking(origin.url("/o/cat")) == BODY
    assert origin.connections == 1
    assert sample(metrics, "clip_worker_fetches_total", scheme="http", outcome="ok") == 20
    assert sample(metrics, "clip_worker_fetched_bytes_total", scheme="http") == 20 * len(BODY)
    assert sample(metrics, "clip_worker_fetch_seconds_count", scheme="http") == 20


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/o/missing", RejectReason.FETCH_NOT_FOUND),
        ("/status/410", RejectReason.FETCH_NOT_FOUND),
        ("/status/403", RejectReason.FETCH_FORBIDDEN),
        ("/status/401", RejectReason.FETCH_FORBIDDEN),
        ("/status/400", RejectReason.FETCH_FAILED),
        ("/hops/6/cat", RejectReason.FETCH_FAILED),
    ],
)
def test_final_answers_are_not_retried(origin, path, reason):
    metrics = WorkerMetrics()
    assert reason_of(make(metrics=metrics), origin.url(path)) == reason
    assert sum(origin.requests.values()) == (6 if path.startswith("/hops") else 1)
    assert sample(metrics, "clip_worker_fetches_total", scheme="http", outcome=reason.value) == 1


def test_redirects_are_followed(origin):
    assert make().fetch_blocking(origin.url("/hops/5/cat")) == BODY


@pytest.mark.parametrize("code", [500, 503, 429])
def test_transient_failures_are_retried(origin, code):
    metrics = WorkerMetrics()
    assert make(metrics=metrics).fetch_blocking(origin.url(f"/flaky/k/{code}/2/cat")) == BODY
    assert origin.requests[f"/flaky/k/{code}/2/cat"] == 3
    assert sample(metrics, "clip_worker_fetch_retries_total", scheme="http") == 2


def test_failures_that_outlast_the_retries_are_fetch_failed(origin):
    assert reason_of(make(retries=2), origin.url("/flaky/k/500/99/cat")) == RejectReason.FETCH_FAILED
    assert origin.requests["/flaky/k/500/99/cat"] == 3


def test_slow_answers_time_out_on_every_try(origin):
    assert reason_of(make(timeout_s=0.3, retries=1), origin.url("/slow/3/cat")) == RejectReason.FETCH_TIMEOUT
    assert origin.requests["/slow/3/cat"] == 2


def test_a_trickling_body_times_out_at_the_deadline(origin):
    started = time.monotonic()
    reason = reason_of(make(timeout_s=0.5, retries=0), origin.url("/trickle/0.1/cat"))
    assert reason == RejectReason.FETCH_TIMEOUT
    assert time.monotonic() - started < 1.5, (
        "each piece arrives within the read timeout; the deadline ends it"
    )


def test_a_declared_size_over_the_limit_is_refused_before_the_body(origin):
    started = time.monotonic()
    reason = reason_of(make(max_bytes=1 << 20), origin.url(f"/huge/{1 << 34}"))
    assert reason == RejectReason.FETCH_TOO_LARGE
    assert time.monotonic() - started < 10, "16 GiB were not read"


def test_an_undeclared_body_is_cut_off_at_the_limit(origin):
    started = time.monotonic()
    assert reason_of(make(max_bytes=1 << 20), origin.url("/endless")) == RejectReason.FETCH_TOO_LARGE
    assert time.monotonic() - started < 10, "the body was not read to its end"
    assert origin.requests["/endless"] == 1, "too large is final"


def test_the_limit_is_inclusive(origin):
    origin.put("exact", b"x" * 4096)
    assert make(max_bytes=4096).fetch_blocking(origin.url("/o/exact")) == b"x" * 4096
    assert reason_of(make(max_bytes=4095), origin.url("/o/exact")) == RejectReason.FETCH_TOO_LARGE


def test_a_truncated_body_is_retried_then_fetch_failed(origin):
    assert reason_of(make(retries=1), origin.url("/truncated/cat")) == RejectReason.FETCH_FAILED
    assert origin.requests["/truncated/cat"] == 2


def test_a_closed_port_is_fetch_failed():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert reason_of(make(retries=1), f"http://127.0.0.1:{port}/x") == RejectReason.FETCH_FAILED


@pytest.mark.parametrize("route", ["continue", "unframed", "chunked"])
def test_every_framing_http_allows_is_read_whole(origin, route):
    # An interim 100 first; a body ended by the connection's close; a body in chunks.
    fetcher = make()
    assert fetcher.fetch_blocking(origin.url(f"/{route}/cat")) == BODY
    assert fetcher.fetch_blocking(origin.url(f"/{route}/cat")) == BODY
    assert origin.connections == (2 if route == "unframed" else 1), "kept alive unless ended by a close"


@pytest.mark.parametrize("route", ["unframed", "chunked"])
def test_undeclared_bodies_are_cut_off_at_the_limit_however_framed(origin, route):
    fetcher = make(max_bytes=len(BODY) - 1)
    assert reason_of(fetcher, origin.url(f"/{route}/cat")) == RejectReason.FETCH_TOO_LARGE


def test_answers_without_a_body_to_read_keep_their_connection(origin):
    fetcher = make()
    assert reason_of(fetcher, origin.url("/o/missing")) == RejectReason.FETCH_NOT_FOUND
    assert fetcher.fetch_blocking(origin.url("/hops/2/cat")) == BODY
    assert origin.connections == 1


def test_a_kept_alive_connection_the_server_dropped_is_replaced_without_a_retry(origin):
    # The server drops the next request on the connection /once was answered on: the fetch goes again
    # at once on a new connection, not as a retry after a backoff.
    metrics = WorkerMetrics()
    fetcher = make(metrics=metrics)
    assert fetcher.fetch_blocking(origin.url("/once/cat")) == BODY
    assert fetcher.fetch_blocking(origin.url("/o/cat")) == BODY
    assert origin.connections == 2
    assert sample(metrics, "clip_worker_fetch_retries_total", scheme="http") == 0


def test_a_second_answer_after_the_first_is_not_read_as_part_of_it(origin):
    fetcher = make()
    assert fetcher.fetch_blocking(origin.url("/double/cat")) == BODY, "the unasked 404 changed nothing"
    assert fetcher.fetch_blocking(origin.url("/o/cat")) == BODY
    assert origin.connections == 2, "a server that answered twice is not trusted with another request"


@pytest.mark.parametrize("route", ["late/0.02/cat/dog", "unsolicited/0.02/cat"])
def test_bytes_on_an_idle_connection_are_never_read_as_the_next_answer(origin, route):
    # The origin answers, then (while the connection sits idle) sends another image's whole answer, or
    # bytes that are no answer: the next request must get its own answer, on a new connection.
    origin.put("dog", b"woof" * 1000)
    fetcher = make()
    for turn in range(1, 4):
        assert fetcher.fetch_blocking(origin.url(f"/{route}")) == BODY
        origin.wait_unasked(turn)
        assert fetcher.fetch_blocking(origin.url("/o/cat")) == BODY, "an unasked answer was taken"
    assert origin.connections == 4, "each connection that spoke unasked was closed, and only those"


def test_no_socket_opens_to_an_address_the_guard_does_not_pass(origin):
    # The pinned address is the origin's, but the guard's verdict at the socket says no: nothing connects.
    async def attempt() -> int:
        transfers = Transfers(4)
        request = Request(
            f"http://images.example.test:{origin.port}/o/cat",
            [],
            permits=lambda address: False,
            pinned=f"+images.example.test:{origin.port}:127.0.0.1",
            max_bytes=1 << 20,
        )
        try:
            with pytest.raises(TransferFailed) as caught:
                await transfers.get(request)
            return caught.value.code
        finally:
            await transfers.close()

    assert asyncio.run(attempt()) == pycurl.E_COULDNT_CONNECT
    assert origin.connections == 0


@pytest.mark.parametrize("path", ["/many-headers/10000", "/many-headers/10000/split"])
def test_a_head_over_the_cap_is_refused_however_it_arrives(origin, path):
    # 10,000 short headers (about 110 KB): in one write, and in 1 KiB pieces.
    with pytest.raises(RejectedRecord, match="headers over 65536 bytes") as caught:
        make().fetch_blocking(origin.url(path))
    assert caught.value.reason == RejectReason.FETCH_FAILED
    assert make().fetch_blocking(origin.url("/many-headers/100")) == b"", "an ordinary head still passes"


def test_no_proxy_from_the_environment_is_used(origin, monkeypatch):
    # A proxy would make the connection itself, where the guard cannot check it.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the discard port: nothing answers there
    assert make().fetch_blocking(origin.url("/o/cat")) == BODY


@pytest.mark.parametrize(
    ("path", "why"), [("/upgrade", "switched protocols"), (f"/fat-header/{1 << 20}", "headers over")]
)
def test_answers_a_get_cannot_have_fail_at_once(origin, path, why):
    started = time.monotonic()
    with pytest.raises(RejectedRecord, match=why) as caught:
        make().fetch_blocking(origin.url(path))
    assert caught.value.reason == RejectReason.FETCH_FAILED
    assert sum(origin.requests.values()) == 1, "not worth another try"
    assert time.monotonic() - started < 1.5


def test_a_body_cut_by_a_reset_is_not_taken_for_whole(origin):
    # Neither a length nor chunks: the body ends with the connection, but a reset is no ending.
    assert reason_of(make(retries=0), origin.url("/reset/cat")) == RejectReason.FETCH_FAILED


def test_a_retry_after_that_is_not_plain_digits_is_no_hint():
    reference = parse_reference("http://images.example/x.jpg", HTTP)
    with pytest.raises(FetchError) as caught:
        answer_body(Answer(503, retry_after="\u00b2"), reference)  # a superscript two: isdigit() but no int
    assert caught.value.retriable and caught.value.retry_after_s is None


def test_idle_connections_make_room_for_new_origins_oldest_first():
    with ImageOrigin() as first, ImageOrigin() as second, ImageOrigin() as third:
        for server in (first, second, third):
            server.put("cat", BODY)
        fetcher = make(concurrency=2)  # two idle connections kept at most
        for server in (first, second, third, third, first):
            assert fetcher.fetch_blocking(server.url("/o/cat")) == BODY
        assert third.connections == 1, "the newest origin's connection was kept, in place of the oldest"
        assert first.connections == 2 and second.connections == 1


def test_an_idle_connection_keeps_no_body_alive(origin):
    # 128 idle connections each holding its last 5 MB answer was 640 MB at the end of a backlog.
    fetcher = make()
    data = fetcher.fetch_blocking(origin.url("/o/cat"))
    answers = [holder for holder in gc.get_referrers(data) if isinstance(holder, Answer)]
    assert answers == [], "the kept-alive connection still holds the answer it delivered"


@pytest.fixture(scope="module")
def tls_origin(tmp_path_factory) -> Iterator[tuple[ImageOrigin, Path]]:
    files = make_tls(tmp_path_factory.mktemp("tls"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.ca_cert.parent / "broker.pem", files.ca_cert.parent / "broker.key")
    with ImageOrigin(tls=context) as server:
        server.put("cat", BODY)
        yield server, files.ca_cert


def test_https_is_fetched_when_the_certificate_matches_the_host(tls_origin, monkeypatch):
    origin, ca = tls_origin
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # how an operator trusts a private CA
    fetcher = make(allow=("127.0.0.1", "localhost"))
    assert fetcher.fetch_blocking(f"https://127.0.0.1:{origin.port}/o/cat") == BODY
    assert fetcher.fetch_blocking(f"https://localhost:{origin.port}/o/cat") == BODY


def test_https_refuses_a_certificate_for_another_name_or_an_untrusted_one(tls_origin, monkeypatch):
    origin, ca = tls_origin
    asked = origin.requests["/o/cat"]
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    # The guard's address is 127.0.0.1, which the certificate names, but the host asked for is not.
    other = make(allow=("127.0.0.1/32",), resolver=lambda host, port: ["127.0.0.1"])
    assert reason_of(other, f"https://images.example.test:{origin.port}/o/cat") == RejectReason.FETCH_FAILED
    monkeypatch.delenv("SSL_CERT_FILE")
    untrusted = make(allow=("127.0.0.1",))
    with pytest.raises(RejectedRecord, match="certificate"):
        untrusted.fetch_blocking(f"https://127.0.0.1:{origin.port}/o/cat")
    assert origin.requests["/o/cat"] == asked, "nothing was asked of a server that could not prove its name"


def test_credentials_stay_out_of_errors_and_metrics(origin):
    metrics = WorkerMetrics()
    fetcher = make(metrics=metrics)
    uri = f"http://user:hunter2@127.0.0.1:{origin.port}/o/missing?X-Amz-Signature=c0ffee&token=t0k3n"
    with pytest.raises(RejectedRecord) as caught:
        fetcher.fetch_blocking(uri)
    text = f"{caught.value} {caught.value.message}"
    assert "hunter2" not in text and "c0ffee" not in text and "t0k3n" not in text
    assert "127.0.0.1" in text
    exposition = generate_latest(metrics.registry).decode()
    assert "hunter2" not in exposition and "c0ffee" not in exposition and "127.0.0.1" not in exposition
    # The HTTP client's own errors name the URL they failed on: never the query of a presigned URL.
    uri = f"http://127.0.0.1:{origin.port}/malformed?X-Amz-Signature=c0ffee"
    with pytest.raises(RejectedRecord) as caught:
        fetcher.fetch_blocking(uri)
    assert caught.value.reason == RejectReason.FETCH_FAILED
    assert "c0ffee" not in f"{caught.value} {caught.value.message}"


# --- S3 ---------------------------------------------------------------------------------------------


@pytest.fixture
def s3_env(monkeypatch):
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


def test_s3_objects_are_fetched_from_an_s3_compatible_endpoint(store, s3_env):
    uri = store.put("images", "cats/one.jpg", BODY)
    metrics = WorkerMetrics()
    fetcher = make(schemes=frozenset({"s3"}), s3_endpoint_url=store.endpoint_url, metrics=metrics)
    assert fetcher.fetch_blocking(uri) == BODY
    assert sample(metrics, "clip_worker_fetches_total", scheme="s3", outcome="ok") == 1


def test_s3_failures_are_typed(store, s3_env):
    store.put("images", "big.jpg", BODY)
    fetcher = make(schemes=frozenset({"s3"}), s3_endpoint_url=store.endpoint_url, max_bytes=1000)
    assert reason_of(fetcher, "s3://images/no-such-key.jpg") == RejectReason.FETCH_NOT_FOUND
    assert reason_of(fetcher, "s3://no-such-bucket/x.jpg") == RejectReason.FETCH_NOT_FOUND
    assert reason_of(fetcher, "s3://images/big.jpg") == RejectReason.FETCH_TOO_LARGE


def test_an_unreachable_s3_endpoint_is_retried_then_fetch_failed(s3_env):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics = WorkerMetrics()
    fetcher = make(
        schemes=frozenset({"s3"}), s3_endpoint_url=f"http://127.0.0.1:{port}", retries=1, metrics=metrics
    )
    assert reason_of(fetcher, "s3://images/x.jpg") == RejectReason.FETCH_FAILED
    assert sample(metrics, "clip_worker_fetch_retries_total", scheme="s3") == 1


# --- file -------------------------------------------------------------------------------------------


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    root = tmp_path / "shared"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "cat.jpg").write_bytes(BODY)
    (tmp_path / "secret.txt").write_bytes(b"secret")
    (root / "escape").symlink_to(tmp_path / "secret.txt")
    (root / "inside").symlink_to(root / "sub" / "cat.jpg")
    return root


def test_files_under_the_root_are_read(shared):
    fetcher = make(schemes=frozenset({"file"}), file_root=shared)
    assert fetcher.fetch_blocking(f"file://{shared}/sub/cat.jpg") == BODY
    assert fetcher.fetch_blocking(f"file://{shared}/inside") == BODY, "a link that stays inside is fine"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("{root}/../secret.txt", RejectReason.FETCH_FORBIDDEN),
        ("{root}/sub/../../secret.txt", RejectReason.FETCH_FORBIDDEN),
        ("{root}/escape", RejectReason.FETCH_FORBIDDEN),
        ("/etc/passwd", RejectReason.FETCH_FORBIDDEN),
        ("{root}/sub/missing.jpg", RejectReason.FETCH_NOT_FOUND),
        ("{root}/sub", RejectReason.FETCH_NOT_FOUND),
    ],
)
def test_files_outside_the_root_or_missing_are_refused(shared, path, reason):
    fetcher = make(schemes=frozenset({"file"}), file_root=shared)
    assert reason_of(fetcher, "file://" + path.format(root=shared)) == reason


def test_files_over_the_limit_are_too_large(shared):
    fetcher = make(schemes=frozenset({"file"}), file_root=shared, max_bytes=100)
    assert reason_of(fetcher, f"file://{shared}/sub/cat.jpg") == RejectReason.FETCH_TOO_LARGE


# --- retries ----------------------------------------------------------------------------------------


def test_backoff_grows_is_capped_and_honours_retry_after():
    policy = RetryPolicy(retries=5, base_delay_s=0.1, max_delay_s=1.0)
    for retry in range(8):
        assert 0 <= policy.delay(retry) <= min(1.0, 0.1 * 2**retry)
    assert policy.delay(0, hint_s=0.7) >= 0.7
    assert policy.delay(0, hint_s=60) == 1.0


def test_only_retriable_failures_are_retried():
    calls: list[int] = []
    sleeps: list[float] = []

    async def attempt() -> bytes:
        calls.append(1)
        raise FetchError(RejectReason.FETCH_NOT_FOUND, "gone")

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    with pytest.raises(FetchError):
        asyncio.run(with_retries(attempt, RetryPolicy(retries=3), sleep=sleep))
    assert len(calls) == 1 and sleeps == []


def test_the_guard_judges_the_address_a_socket_is_about_to_reach():
    guard = AddressGuard(("127.0.0.1/32", "images.internal"))
    assert guard.permits("images.example.test", "127.0.0.1")
    assert guard.permits("images.example.test", "::ffff:127.0.0.1"), "as the socket layer writes it"
    assert guard.permits("images.example.test", "8.8.8.8")
    assert not guard.permits("images.example.test", "10.0.0.1")
    assert not guard.permits("images.example.test", "169.254.169.254")
    assert not guard.permits("images.example.test", "not an address")
    assert guard.permits("images.internal", "10.0.0.1"), "a host opened by name goes wherever it resolves"
