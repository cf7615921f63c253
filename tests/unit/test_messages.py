import msgpack
import numpy as np
import pytest

from tests.support.schemas import validate_dlq_headers, validate_msgpack
from worker.errors import RejectedRecord, RejectReason
from worker.messages import (
    REASON_HEADER,
    InputKind,
    Request,
    Source,
    decode_embedding,
    decode_request,
    dlq_headers,
    encode_embedding,
    encode_request,
)


def test_request_round_trip_and_schema():
    raw = encode_request("cat.jpg", b"\xff\xd8bytes", {"shard": 3})
    validate_msgpack(raw, "image-request.schema.json")
    request = decode_request(raw)
    assert request == Request("cat.jpg", b"\xff\xd8bytes", {"shard": 3})


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"image": b"x"}, InputKind.IMAGE),
        ({"uri": "s3://bucket/cat.jpg"}, InputKind.URI),
        ({"text": "a photo of a dog"}, InputKind.TEXT),
        ({"image": b"x", "uri": None, "text": None}, InputKind.IMAGE),  # a null field is an absent one
    ],
)
def test_a_request_carries_exactly_one_input_and_names_its_kind(fields, kind):
    raw = msgpack.packb({"id": "a", **fields}, use_bin_type=True)
    validate_msgpack(raw, "image-request.schema.json")
    request = decode_request(raw)
    assert request.kind is kind
    assert getattr(request, kind.value) == fields[kind.value]


def test_request_without_version_or_meta_is_accepted():
    raw = msgpack.packb({"id": "a", "image": b"x"}, use_bin_type=True)
    assert decode_request(raw) == Request("a", b"x", {})


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", RejectReason.INVALID_MSGPACK),
        (None, RejectReason.INVALID_MSGPACK),
        (b"\xc1", RejectReason.INVALID_MSGPACK),
        (msgpack.packb({"id": "a", "image": b"x"}) + b"trailing", RejectReason.INVALID_MSGPACK),
        (msgpack.packb([1, 2, 3]), RejectReason.INVALID_ENVELOPE),
        (msgpack.packb({"image": b"x"}, use_bin_type=True), RejectReason.INVALID_ENVELOPE),
        (msgpack.packb({"id": "", "image": b"x"}, use_bin_type=True), RejectReason.INVALID_ENVELOPE),
        (msgpack.packb({"id": 5, "image": b"x"}, use_bin_type=True), RejectReason.INVALID_ENVELOPE),
        (msgpack.packb({"id": "a", "image": "text"}, use_bin_type=True), RejectReason.INVALID_ENVELOPE),
        (msgpack.packb({"id": "a"}, use_bin_type=True), RejectReason.INVALID_ENVELOPE),
        (
            msgpack.packb({"id": "a", "image": b"x", "meta": [1]}, use_bin_type=True),
            RejectReason.INVALID_ENVELOPE,
        ),
        (msgpack.packb({"id": "a" * 2000, "image": b"x"}, use_bin_type=True), RejectReason.INVALID_ENVELOPE),
        (b"\x82\xa2id\xa2\xff\xfe\xa5image\xc4\x01x", RejectReason.INVALID_ENVELOPE),  # id not UTF-8
        (
            msgpack.packb({"v": 2, "id": "a", "image": b"x"}, use_bin_type=True),
            RejectReason.UNSUPPORTED_VERSION,
        ),
        (
            msgpack.packb({"v": "1", "id": "a", "image": b"x"}, use_bin_type=True),
            RejectReason.UNSUPPORTED_VERSION,
        ),
        (
            msgpack.packb({"v": True, "id": "a", "image": b"x"}, use_bin_type=True),
            RejectReason.UNSUPPORTED_VERSION,
        ),
        (msgpack.packb({"id": "a", "image": b"x", "uri": "http://h/x"}), RejectReason.INVALID_ENVELOPE),
        (msgpack.packb({"id": "a", "uri": "s3://b/k", "text": "dog"}), RejectReason.INVALID_ENVELOPE),
        (msgpack.packb({"id": "a", "uri": b"http://h/x"}, use_bin_type=True), RejectReason.INVALID_ENVELOPE),
        (msgpack.packb({"id": "a", "uri": ""}), RejectReason.INVALID_ENVELOPE),
        (msgpack.packb({"id": "a", "text": 7}), RejectReason.INVALID_ENVELOPE),
        (msgpack.packb({"id": "a", "text": "x" * 20_000}), RejectReason.INVALID_ENVELOPE),
        (msgpack.packb({"id": "a", "uri": "http://h/" + "x" * 9000}), RejectReason.INVALID_ENVELOPE),
    ],
)
def test_bad_requests_are_rejected_with_a_typed_reason(value, reason):
    with pytest.raises(RejectedRecord) as caught:
        decode_request(value)
    assert caught.value.reason is reason
    assert caught.value.message


def test_embedding_record_matches_schema_and_round_trips():
    vector = np.linspace(-1, 1, 768, dtype=np.float32)
    vector /= np.linalg.norm(vector)
    request = Request("x", b"img", {"k": "v"})
    raw = encode_embedding(request, vector, "openai/clip-vit-large-patch14", Source("images", 2, 41), False)
    decoded = validate_msgpack(raw, "image-embedding.schema.json")
    assert "image" not in decoded
    assert decoded["embedding"] == vector.astype("<f4").tobytes()
    record = decode_embedding(raw)
    np.testing.assert_array_equal(record["embedding"], vector)
    assert record["dim"] == 768
    assert record["source"] == {"topic": "images", "partition": 2, "offset": 41}
    assert record["meta"] == {"k": "v"}


def test_forward_image_includes_original_bytes():
    request = Request("x", b"original", {})
    raw = encode_embedding(request, np.ones(4, np.float32) / 2, "m", Source("t", 0, 0), True)
    assert validate_msgpack(raw, "image-embedding.schema.json")["image"] == b"original"


def test_dlq_headers_keep_originals_replace_ours_and_match_schema():
    original = [("trace", b"abc"), ("clip-worker-reason", b"stale")]
    headers = dlq_headers(original, RejectReason.NOT_AN_IMAGE, "x" * 2000, Source("images", 1, 9))
    shown = validate_dlq_headers(headers)
    assert shown["trace"] == "abc"
    assert [k for k, _ in headers].count(REASON_HEADER) == 1
    assert shown[REASON_HEADER] == "not_an_image"
    assert shown["clip-worker-source-offset"] == "9"
    assert len(shown["clip-worker-error"]) == 512


def test_every_reason_is_in_the_dlq_schema():
    from tests.support.schemas import load_schema

    vocabulary = load_schema("dlq-headers.schema.json")["properties"][REASON_HEADER]["enum"]
    assert sorted(vocabulary) == sorted(r.value for r in RejectReason)


def test_float16_embeddings_halve_the_vector_match_the_schema_and_decode_as_float16():
    vector = np.linspace(-1, 1, 768, dtype=np.float32)
    vector /= np.linalg.norm(vector)
    request = Request("x", b"img", {})
    source = Source("images", 0, 1)
    wide = encode_embedding(request, vector, "m", source, False)
    raw = encode_embedding(request, vector, "m", source, False, dtype="float16")
    decoded = validate_msgpack(raw, "image-embedding.schema.json")
    assert decoded["dtype"] == "float16" and decoded["dim"] == 768
    assert len(decoded["embedding"]) == 2 * 768
    assert len(wide) - len(raw) == 2 * 768, "half the embedding bytes, the rest of the record alike"
    record = decode_embedding(raw)
    assert record["embedding"].dtype == np.dtype("<f2")
    np.testing.assert_allclose(record["embedding"], vector, atol=1e-3)


def test_a_request_by_reference_gets_its_uri_back_masked_and_the_bytes_only_if_forwarded():
    vector = np.ones(4, dtype=np.float32) / 2
    source = Source("images", 0, 3)
    signed = "https://bucket.example.com/a.jpg?X-Amz-Signature=abc123&X-Amz-Credential=AKIA"
    request = Request("x", uri=signed)
    plain = validate_msgpack(
        encode_embedding(request, vector, "m", source, False), "image-embedding.schema.json"
    )
    assert plain["uri"] == "https://bucket.example.com/a.jpg?X-Amz-Signature=***&X-Amz-Credential=***"
    assert "image" not in plain
    forwarded = validate_msgpack(
        encode_embedding(request, vector, "m", source, True, fetched=b"jpeg"), "image-embedding.schema.json"
    )
    assert forwarded["image"] == b"jpeg"
    s3 = encode_embedding(Request("y", uri="s3://b/k?v=1"), vector, "m", source, False)
    assert validate_msgpack(s3, "image-embedding.schema.json")["uri"] == "s3://b/k?v=1"
    inline = validate_msgpack(
        encode_embedding(Request("z", image=b"img"), vector, "m", source, True), "image-embedding.schema.json"
    )
    assert inline["image"] == b"img" and "uri" not in inline
