"""The message contracts in code: request decoding, output encoding, DLQ headers.

``schemas/`` is the single source of truth; tests validate real records against it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from worker.errors import RejectedRecord, RejectReason
from worker.fetching.uri import MAX_URI_LENGTH, redact

SCHEMA_VERSION = 1
MAX_ID_LENGTH = 1024
MAX_TEXT_LENGTH = 16384  # characters; the tokenizer truncates to the model's context anyway
HEADER_PREFIX = "clip-worker-"
REASON_HEADER = HEADER_PREFIX + "reason"
ERROR_HEADER = HEADER_PREFIX + "error"
SOURCE_TOPIC_HEADER = HEADER_PREFIX + "source-topic"
SOURCE_PARTITION_HEADER = HEADER_PREFIX + "source-partition"
SOURCE_OFFSET_HEADER = HEADER_PREFIX + "source-offset"
FAILED_AT_HEADER = HEADER_PREFIX + "failed-at-ms"
VALUE_OMITTED_HEADER = HEADER_PREFIX + "value-omitted-bytes"
HEADERS_OMITTED_HEADER = HEADER_PREFIX + "headers-omitted"
KEY_TRUNCATED_HEADER = HEADER_PREFIX + "key-truncated-bytes"
NULL_VALUE_HEADER = HEADER_PREFIX + "value-was-null"
# The headers a dead letter gets. A record dead-lettered before (replayed from the DLQ, say) has its old
# copies replaced; any other header, clip-worker-* or not, travels unchanged.
DLQ_HEADERS = frozenset(
    {
        REASON_HEADER,
        ERROR_HEADER,
        SOURCE_TOPIC_HEADER,
        SOURCE_PARTITION_HEADER,
        SOURCE_OFFSET_HEADER,
        FAILED_AT_HEADER,
        VALUE_OMITTED_HEADER,
        HEADERS_OMITTED_HEADER,
        KEY_TRUNCATED_HEADER,
        NULL_VALUE_HEADER,
    }
)
MAX_ERROR_MESSAGE = 512
# The element types an embedding is published in, by the record's ``dtype``: little-endian either way.
EMBEDDING_DTYPES = {"float32": "<f4", "float16": "<f2"}

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Source:
    """Where a record came from."""

    topic: str
    partition: int
    offset: int

    def as_dict(self) -> dict[str, Any]:
        """The ``source`` map of an output record."""
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


class Modality(enum.StrEnum):
    """Which tower of the model embeds a request: the output record's ``kind``, a batch's, a metric's."""

    IMAGE = "image"
    TEXT = "text"


class InputKind(enum.StrEnum):
    """What a request carries to embed: exactly one of these envelope fields, named by the value."""

    IMAGE = "image"  # the encoded image file itself (msgpack bin)
    URI = "uri"  # where to fetch the image from
    TEXT = "text"  # a text to embed with the model's text tower

    @property
    def modality(self) -> Modality:
        """The tower that embeds a request of this kind (a fetched image is an image)."""
        return Modality.TEXT if self is InputKind.TEXT else Modality.IMAGE


@dataclass(frozen=True)
class Request:
    """A decoded request record: its id, its ``meta``, and the one input it carries (see :attr:`kind`)."""

    id: str
    image: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    uri: str | None = None
    text: str | None = None

    @property
    def kind(self) -> InputKind:
        """Which input the request carries."""
        if self.image is not None:
            return InputKind.IMAGE
        return InputKind.URI if self.uri is not None else InputKind.TEXT


def decode_request(value: bytes | None) -> Request:
    """Decode a request record's value; raise :class:`RejectedRecord` with a typed reason otherwise.

    Whether this worker handles the request's kind is the intake stage's decision, not the envelope's.
    """
    if not value:
        raise RejectedRecord(RejectReason.INVALID_MSGPACK, "record value is empty")
    try:
        payload = msgpack.unpackb(value, raw=False, strict_map_key=False)
    except UnicodeDecodeError:
        raise RejectedRecord(
            RejectReason.INVALID_ENVELOPE, "a string in the record is not valid UTF-8"
        ) from None
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise RejectedRecord(RejectReason.INVALID_MSGPACK, f"value is not msgpack: {exc}") from None
    if not isinstance(payload, dict):
        raise RejectedRecord(
            RejectReason.INVALID_ENVELOPE, f"value must be a msgpack map, got {type(payload).__name__}"
        )
    version = payload.get("v", SCHEMA_VERSION)
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise RejectedRecord(
            RejectReason.UNSUPPORTED_VERSION, f"schema version {version!r} is not supported (expected 1)"
        )
    request_id = payload.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise RejectedRecord(RejectReason.INVALID_ENVELOPE, "field 'id' must be a non-empty string")
    if len(request_id) > MAX_ID_LENGTH:
        raise RejectedRecord(
            RejectReason.INVALID_ENVELOPE, f"field 'id' is longer than {MAX_ID_LENGTH} characters"
        )
    meta = payload.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise RejectedRecord(RejectReason.INVALID_ENVELOPE, "field 'meta' must be a map when present")
    kind, content = _input_of(payload)
    if isinstance(content, bytes):
        return Request(id=request_id, image=content, meta=meta)
    if kind is InputKind.URI:
        return Request(id=request_id, meta=meta, uri=content)
    return Request(id=request_id, meta=meta, text=content)


def _input_of(payload: dict[Any, Any]) -> tuple[InputKind, bytes | str]:
    """The request's one input field, type-checked."""
    present = [kind for kind in InputKind if payload.get(kind.value) is not None]
    if len(present) != 1:
        names = " or ".join(f"'{kind.value}'" for kind in InputKind)
        found = ", ".join(f"'{kind.value}'" for kind in present) or "none"
        raise RejectedRecord(
            RejectReason.INVALID_ENVELOPE, f"a request carries exactly one of {names}; found {found}"
        )
    kind = present[0]
    content = payload[kind.value]
    if kind is InputKind.IMAGE:
        if not isinstance(content, bytes):
            raise RejectedRecord(
                RejectReason.INVALID_ENVELOPE,
                f"field 'image' must be msgpack bin, got {type(content).__name__}",
            )
        return kind, content
    limit = MAX_URI_LENGTH if kind is InputKind.URI else MAX_TEXT_LENGTH
    if not isinstance(content, str) or not content:
        raise RejectedRecord(
            RejectReason.INVALID_ENVELOPE, f"field '{kind.value}' must be a non-empty string"
        )
    if len(content) > limit:
        raise RejectedRecord(
            RejectReason.INVALID_ENVELOPE, f"field '{kind.value}' is longer than {limit} characters"
        )
    return kind, content


def encode_request(request_id: str, image: bytes, meta: dict[str, Any] | None = None) -> bytes:
    """Encode a request record value (used by ``clip-worker produce``, the demo and tests)."""
    return _encode_input(request_id, InputKind.IMAGE, image, meta)


def encode_reference(request_id: str, uri: str, meta: dict[str, Any] | None = None) -> bytes:
    """Encode a request by reference: the image is fetched from ``uri`` (``clip-worker produce
    --by-reference``, tests)."""
    return _encode_input(request_id, InputKind.URI, uri, meta)


def encode_text_request(request_id: str, text: str, meta: dict[str, Any] | None = None) -> bytes:
    """Encode a request record value that carries a text to embed."""
    return _encode_input(request_id, InputKind.TEXT, text, meta)


def _encode_input(
    request_id: str, kind: InputKind, content: bytes | str, meta: dict[str, Any] | None
) -> bytes:
    payload: dict[str, Any] = {"v": SCHEMA_VERSION, "id": request_id, kind.value: content}
    if meta:
        payload["meta"] = meta
    packed: bytes = msgpack.packb(payload, use_bin_type=True)
    return packed


def encode_embedding(
    request: Request,
    embedding: np.ndarray,
    model: str,
    source: Source,
    forward_image: bool,
    dtype: str = "float32",
    scores: Mapping[str, float] | None = None,
    fetched: bytes | None = None,
) -> bytes:
    """Encode one output record: the embedding as little-endian ``dtype`` bytes (a key of
    :data:`EMBEDDING_DTYPES`) plus its context, and the ``scores`` of the heads run on it, if any.
    ``kind`` says which tower embedded it; a text is not echoed (the request's ``meta``, which is, can carry
    it). A ``uri`` request gets its ``uri`` back (credentials masked, see :func:`shown_uri`); with
    ``forward_image`` the record also carries the image: the request's own bytes, or ``fetched``, the bytes
    its ``uri`` was fetched as."""
    vector = np.ascontiguousarray(embedding, dtype=EMBEDDING_DTYPES[dtype])
    payload: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "id": request.id,
        "embedding": vector.tobytes(),
        "dim": int(vector.shape[0]),
        "dtype": dtype,
        "model": model,
        "normalized": True,
        "meta": request.meta,
        "source": source.as_dict(),
        "kind": request.kind.modality.value,
    }
    if scores:
        payload["scores"] = dict(scores)
    if request.uri is not None:
        payload["uri"] = shown_uri(request.uri)
    image = request.image if request.image is not None else fetched
    if forward_image and image is not None:
        payload["image"] = image
    packed: bytes = msgpack.packb(payload, use_bin_type=True)
    return packed


def shown_uri(uri: str) -> str:
    """A request's ``uri`` as echoed in its output: an http(s) URI with userinfo or a query has those
    masked (presigned URLs carry their signature there); other URIs are unchanged."""
    if uri[:5].lower() == "http:" or uri[:6].lower() == "https:":
        return redact(uri)
    return uri


def decode_embedding(value: bytes) -> dict[str, Any]:
    """Decode an output record; ``embedding`` becomes a numpy vector of the record's ``dtype`` (float32 for
    records that name none)."""
    payload: dict[str, Any] = msgpack.unpackb(value, raw=False, strict_map_key=False)
    element = EMBEDDING_DTYPES[payload.get("dtype", "float32")]
    payload["embedding"] = np.frombuffer(payload["embedding"], dtype=element)
    return payload


def dlq_headers(original: Headers | None, reason: RejectReason, message: str, source: Source) -> Headers:
    """The original headers plus the error headers of a dead-lettered record."""
    headers = [(k, v) for k, v in (original or []) if k not in DLQ_HEADERS]
    headers += [
        (REASON_HEADER, reason.value.encode()),
        (ERROR_HEADER, message[:MAX_ERROR_MESSAGE].encode("utf-8", "replace")),
        (SOURCE_TOPIC_HEADER, source.topic.encode()),
        (SOURCE_PARTITION_HEADER, str(source.partition).encode()),
        (SOURCE_OFFSET_HEADER, str(source.offset).encode()),
        (FAILED_AT_HEADER, str(int(time.time() * 1000)).encode()),
    ]
    return headers
