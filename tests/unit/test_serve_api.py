"""serve's request shapes: what OpenAI's embeddings API takes is taken, anything else is a 4xx that names the
parameter; image inputs are data URIs, bare base64 or URIs; vectors go out as floats or base64."""

from __future__ import annotations

import base64
import logging

import numpy as np
import pytest

from worker.config import MAX_TEXT_CHARS
from worker.errors import RejectedRecord, RejectReason
from worker.messages import MAX_TEXT_LENGTH
from worker.serving.api import ApiError, encode, parse_request, rejection_error
from worker.serving.images import parse_image
from worker.serving.limits import ServeLimits

LIMITS = ServeLimits(
    max_request_bytes=1 << 20, max_inputs=4, max_text_chars=20, max_image_bytes=64, retry_after_s=1
)


def refused(payload: object) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_request(payload, LIMITS)
    return caught.value


def test_a_string_or_a_list_of_strings_is_taken():
    assert parse_request({"input": "a dog"}, LIMITS).inputs == ["a dog"]
    request = parse_request({"input": ["a", "b"], "model": "m", "encoding_format": "base64"}, LIMITS)
    assert (request.inputs, request.model, request.encoding_format) == (["a", "b"], "m", "base64")
    assert parse_request({"input": "x", "modality": "image"}, LIMITS).modality == "image"


@pytest.mark.parametrize(
    ("payload", "param", "code"),
    [
        ({"input": []}, "input", "invalid_request"),
        ({"input": ""}, "input", "invalid_request"),
        ({"input": ["a", ""]}, "input", "invalid_request"),
        ({"input": [1, 2, 3]}, "input", "invalid_request"),
        ({"input": 5}, "input", "invalid_request"),
        ({"input": ["a"] * 5}, "input", "too_many_inputs"),
        ({"input": "a" * 21}, "input", "text_too_long"),
        ({}, "input", "invalid_request"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", "invalid_request"),
        ({"input": "a", "dimensions": "8"}, "dimensions", "invalid_request"),
        ({"input": "a", "model": 3}, "model", "invalid_request"),
        ({"input": "a", "temperature": 1}, "temperature", "unknown_parameter"),
        ({"input": "a", "modality": "audio"}, "modality", "invalid_request"),
        (["a"], None, "invalid_request"),
    ],
)
def test_a_request_outside_the_api_is_a_400_naming_its_parameter(payload, param, code):
    error = refused(payload)
    assert (error.status, error.param, error.code, error.type) == (400, param, code, "invalid_request_error")
    assert error.body()["error"]["message"]


def test_an_image_input_is_not_held_to_the_text_length():
    assert parse_request({"input": "a" * 40, "modality": "image"}, LIMITS).inputs == ["a" * 40]


def test_the_text_limit_is_the_envelopes():
    assert MAX_TEXT_CHARS == MAX_TEXT_LENGTH


def test_base64_is_the_little_endian_float32_bytes_of_the_float_vector():
    vector = np.array([0.1, -0.5, 0.25], dtype=np.float32)
    encoded = encode(vector, "base64")
    assert isinstance(encoded, str)
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert np.array_equal(decoded, vector)
    assert encode(vector, "float") == [float(v) for v in vector]


def test_images_come_as_data_uris_bare_base64_or_uris():
    data = b"\x89PNG\r\n\x1a\n" + b"x" * 8
    encoded = base64.b64encode(data).decode()
    assert parse_image(f"data:image/png;base64,{encoded}", 0, 64).data == data
    assert parse_image(encoded, 0, 64).data == data
    assert parse_image("https://example.com/a.jpg", 0, 64).uri == "https://example.com/a.jpg"
    assert parse_image("s3://bucket/key.jpg", 0, 64).uri == "s3://bucket/key.jpg"


@pytest.mark.parametrize(
    ("text", "status", "code"),
    [
        ("not base64 at all!", 400, "invalid_image_input"),
        ("!" * 400, 413, "image_too_large"),  # not base64 either: only the length can have refused it
        ("data:image/png,rawbytes", 400, "invalid_request"),
        (base64.b64encode(b"x" * 65).decode(), 413, "image_too_large"),
        ("data:image/png;base64," + base64.b64encode(b"x" * 300).decode(), 413, "image_too_large"),
    ],
)
def test_an_image_input_that_cannot_be_read_is_refused_before_decoding(text, status, code):
    with pytest.raises(ApiError) as caught:
        parse_image(text, 2, 64)
    assert (caught.value.status, caught.value.code) == (status, code)
    assert "input[2]" in caught.value.message


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        (RejectReason.FETCH_FORBIDDEN, 403),
        (RejectReason.IMAGE_TOO_LARGE, 413),
        (RejectReason.FETCH_TOO_LARGE, 413),
        (RejectReason.NOT_AN_IMAGE, 422),
        (RejectReason.FETCH_NOT_FOUND, 422),
        (RejectReason.FETCH_TIMEOUT, 504),
        (RejectReason.INFERENCE_FAILED, 500),
    ],
)
def test_what_the_worker_would_dead_letter_is_answered_with_its_status(reason, status):
    error = rejection_error(1, RejectedRecord(reason, "why"))
    assert (error.status, error.code, error.param) == (status, reason.value, "input")
    assert error.message.startswith("input[1]: ")


@pytest.mark.parametrize("reason", [reason for reason in RejectReason if reason.value.startswith("fetch_")])
def test_a_failed_fetch_tells_the_client_its_reason_and_only_the_log_its_detail(
    reason: RejectReason, caplog: pytest.LogCaptureFixture
):
    detail = "10.0.3.7 resolved from internal.example: connection refused on port 9000"
    with caplog.at_level(logging.INFO, logger="worker.serving.api"):
        error = rejection_error(0, RejectedRecord(reason, detail))
    assert error.code == reason.value and error.message.startswith("input[0]: ")
    assert "10.0.3.7" not in error.message and "refused" not in error.message
    assert detail in caplog.text


def test_other_rejections_keep_the_workers_message():
    assert rejection_error(1, RejectedRecord(RejectReason.NOT_AN_IMAGE, "why")).message == "input[1]: why"
