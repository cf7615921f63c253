"""Parsing a request's ``uri`` into a :class:`Reference`, checking its scheme, and redacting it for display.

Supported: ``http://`` and ``https://``, ``s3://bucket/key`` (the key verbatim, as the AWS CLI writes
it) and ``file:///absolute/path`` (percent-encoded). A URI that cannot be parsed is an envelope error; a
scheme that is not enabled is ``fetch_forbidden``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from worker.errors import RejectedRecord, RejectReason
from worker.fetching.outcomes import forbidden

SCHEMES = ("http", "https", "s3", "file")
MAX_URI_LENGTH = 8192
DEFAULT_PORTS = {"http": 80, "https": 443}
# Printable ASCII without spaces: anything else (controls, CR/LF) could smuggle headers, so an http(s)
# or file URI must arrive percent-encoded. An S3 key is taken verbatim (boto3 encodes it), so it may hold
# spaces and any Unicode, but no control characters.
_URI_CHARS = re.compile(r"^[\x21-\x7e]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# S3's bucket naming rules (the lenient legacy ones: dots and upper case stay out).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Reference:
    """A parsed ``uri``.

    http(s): ``host`` (IPv6 without brackets), ``port``, ``target`` (path and query), and the
    ``username``/``password`` of the userinfo, if any. s3: ``host`` is the bucket and ``target`` the key.
    file: ``target`` is the decoded absolute path.
    """

    scheme: str
    uri: str
    host: str
    port: int
    target: str
    username: str | None = None
    password: str | None = None

    @property
    def shown(self) -> str:
        """The URI as it may appear in logs and dead letters (see :func:`redact`)."""
        return redact(self.uri)

    @property
    def origin(self) -> tuple[str, str, int]:
        """Scheme, host and port: what a redirect must keep for credentials to travel with it."""
        return self.scheme, self.host, self.port


def parse_reference(uri: str, enabled: frozenset[str] | set[str]) -> Reference:
    """Parse ``uri`` and check its scheme is enabled.

    Raises :class:`RejectedRecord` (``invalid_envelope``) for a malformed URI and
    :class:`~worker.fetching.outcomes.FetchError` (``fetch_forbidden``) for a scheme not enabled.
    """
    if not isinstance(uri, str) or not uri:
        raise _invalid("field 'uri' must be a non-empty string")
    if len(uri) > MAX_URI_LENGTH:
        raise _invalid(f"field 'uri' is longer than {MAX_URI_LENGTH} characters")
    if _CONTROL.search(uri):
        raise _invalid("field 'uri' holds control characters")
    scheme, sep, _rest = uri.partition(":")
    scheme = scheme.lower()
    if scheme != "s3" and not _URI_CHARS.match(uri):
        raise _invalid("field 'uri' holds spaces or non-ASCII characters; percent-encode them")
    if not sep or scheme not in SCHEMES:
        shown = scheme[:16] if sep else "none"
        raise forbidden(f"scheme {shown!r} is not supported (one of {', '.join(SCHEMES)})")
    if scheme not in enabled:
        raise forbidden(f"scheme {scheme!r} is not enabled (--fetch-schemes)")
    if scheme == "s3":
        return _parse_s3(uri)
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise _invalid(f"field 'uri' is not a valid URI: {exc}") from None
    if scheme == "file":
        return _parse_file(uri, parts)
    return _parse_http(uri, scheme, parts)


def _parse_http(uri: str, scheme: str, parts: SplitResult) -> Reference:
    host = parts.hostname
    if not host:
        raise _invalid(f"{redact(uri)} has no host")
    if "%" in host:  # the guard would look up the name as written, and the client connect to the decoded one
        raise _invalid(f"{redact(uri)} has a percent-encoded host name; write it out")
    try:
        written = parts.port
    except ValueError:
        raise _invalid(f"{redact(uri)} has an invalid port") from None
    if written == 0:
        raise _invalid(f"{redact(uri)} has an invalid port (0)")
    # An empty port (``http://host:/x``) is the scheme's default, as RFC 3986 section 3.2.3 has it.
    port = DEFAULT_PORTS[scheme] if written is None else written
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return Reference(scheme, uri, host.lower(), port, target, username, password)


def _parse_s3(uri: str) -> Reference:
    bucket, _, key = uri[len("s3://") :].partition("/") if uri[:5].lower() == "s3://" else ("", "", "")
    if not _BUCKET.match(bucket):
        raise _invalid(f"{redact(uri)} does not name a valid bucket (s3://bucket/key)")
    if not key:
        raise _invalid(f"{redact(uri)} has no object key (s3://bucket/key)")
    return Reference("s3", uri, bucket, 0, key)


def _parse_file(uri: str, parts: SplitResult) -> Reference:
    if parts.netloc not in ("", "localhost"):
        raise _invalid(f"{redact(uri)}: a file URI names no host (file:///path)")
    path = unquote(parts.path)
    if not path.startswith("/") or "\0" in path:
        raise _invalid(f"{redact(uri)}: a file URI holds an absolute path (file:///path)")
    return Reference("file", uri, "", 0, path)


def redact(uri: str) -> str:
    """``uri`` without secrets: userinfo becomes ``***@`` and every query value ``***`` (presigned URLs
    carry their signature and credential there); the fragment is dropped. Never raises."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable uri>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(_redact_parameter(piece) for piece in parts.query.split("&")) if parts.query else ""
    shown = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path
    return shown + (f"?{query}" if query else "")


def _redact_parameter(piece: str) -> str:
    name, sep, _value = piece.partition("=")
    return f"{name[:64]}=***" if sep else "***"


def _invalid(message: str) -> RejectedRecord:
    return RejectedRecord(RejectReason.INVALID_ENVELOPE, message)
