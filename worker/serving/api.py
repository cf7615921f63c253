"""The embeddings API's shapes: OpenAI's ``POST /v1/embeddings`` request and response, and its error shape.

Texts are OpenAI's request as it is. Images follow infinity's choice: the same endpoint with
``"modality": "image"`` (OpenAI's client sends it with ``extra_body``), each input a data URI, bare base64
or a URI to fetch. Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with the status
codes docs/serve.md lists.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError

from worker.errors import RejectedRecord, RejectReason
from worker.serving.limits import ServeLimits

log = logging.getLogger(__name__)

ErrorType = Literal["invalid_request_error", "rate_limit_error", "server_error"]


class ApiError(Exception):
    """An answer in OpenAI's error shape: ``status`` with ``message``, ``type``, ``param`` and ``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        error_type: ErrorType | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type: ErrorType = error_type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    """A 400: the request is not one this API takes."""
    return ApiError(400, message, code, param)


# What an input the worker would dead-letter is answered with: the client's fault (4xx), except a store
# that failed (502/504) and inference itself (500).
_REJECTION_STATUS = {
    RejectReason.INVALID_ENVELOPE: 400,
    RejectReason.EMPTY_IMAGE: 400,
    RejectReason.FETCH_FORBIDDEN: 403,
    RejectReason.IMAGE_TOO_LARGE: 413,
    RejectReason.DECOMPRESSION_BOMB: 413,
    RejectReason.FETCH_TOO_LARGE: 413,
    RejectReason.NOT_AN_IMAGE: 422,
    RejectReason.TRUNCATED_IMAGE: 422,
    RejectReason.CORRUPT_IMAGE: 422,
    RejectReason.IMAGE_TOO_SMALL: 422,
    RejectReason.FETCH_NOT_FOUND: 422,
    RejectReason.FETCH_FAILED: 502,
    RejectReason.FETCH_TIMEOUT: 504,
}


# What a client is told of a fetch that failed: the worker's own message names resolved addresses, DNS and
# connection errors, which would map the server's network for whoever asks. It is logged here instead.
_FETCH_MESSAGES = {
    RejectReason.FETCH_FORBIDDEN: "the URI is not one this server fetches (its scheme, host or address is "
    "not allowed)",
    RejectReason.FETCH_TOO_LARGE: "the image at the URI is larger than this server takes",
    RejectReason.FETCH_NOT_FOUND: "nothing was found at the URI",
    RejectReason.FETCH_FAILED: "fetching the URI failed",
    RejectReason.FETCH_TIMEOUT: "fetching the URI timed out",
}


def rejection_error(index: int, rejection: RejectedRecord) -> ApiError:
    """The answer to a request one of whose inputs the worker's own checks reject."""
    status = _REJECTION_STATUS.get(rejection.reason, 500)
    message = _FETCH_MESSAGES.get(rejection.reason)
    if message is None:
        message = rejection.message
    else:
        log.info("serve: input[%d] answered %s: %s", index, rejection.reason.value, rejection.message)
    return ApiError(status, f"input[{index}]: {message}", rejection.reason.value, "input")


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: OpenAI's fields, plus infinity's ``modality`` for images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    modality: Literal["text", "image"] = "text"

    @property
    def inputs(self) -> list[str]:
        """The inputs as a list (a single string is a list of one)."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


def parse_request(payload: Any, limits: ServeLimits) -> EmbeddingRequest:
    """The request in ``payload`` (parsed JSON), checked against ``limits``; raises :class:`ApiError`."""
    if not isinstance(payload, dict):
        raise invalid("the body must be a JSON object with 'input'")
    try:
        request = EmbeddingRequest.model_validate(payload)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    inputs = request.inputs
    if not inputs:
        raise invalid("'input' is empty: give a string or a list of at least one string", "input")
    if len(inputs) > limits.max_inputs:
        raise invalid(
            f"'input' has {len(inputs)} items; at most {limits.max_inputs} per request (--serve-max-inputs)",
            "input",
            "too_many_inputs",
        )
    for index, text in enumerate(inputs):
        if not text:
            raise invalid(f"input[{index}] is an empty string", "input")
        if request.modality == "text" and len(text) > limits.max_text_chars:
            raise invalid(
                f"input[{index}] has {len(text)} characters; at most {limits.max_text_chars} "
                "(--serve-max-text-chars)",
                "input",
                "text_too_long",
            )
    return request


def _validation_error(exc: ValidationError) -> ApiError:
    error = exc.errors()[0]
    location = [str(part) for part in error.get("loc", ())]
    param = location[0] if location else None
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return invalid(f"unknown parameter {param!r}", param, "unknown_parameter")
    if kind == "missing":
        return invalid(f"missing required parameter {param!r}", param)
    if param == "input":
        return invalid(
            "'input' must be a string or a list of strings (token ids are not taken: send the texts)", param
        )
    return invalid(f"invalid {param!r}: {error.get('msg', 'invalid value')}", param)


@dataclass(frozen=True)
class Embeddings:
    """A request's answer: one unit vector per input, in order, and the scores of ``--score``'s heads."""

    vectors: np.ndarray
    scores: list[dict[str, float]] | None
    tokens: int


def embedding_response(result: Embeddings, model: str, encoding_format: str) -> dict[str, Any]:
    """OpenAI's response body: ``data`` (one ``embedding`` per input), ``model`` and ``usage``."""
    data: list[dict[str, Any]] = []
    for index, vector in enumerate(result.vectors):
        item: dict[str, Any] = {
            "object": "embedding",
            "index": index,
            "embedding": encode(vector, encoding_format),
        }
        if result.scores is not None:
            item["scores"] = result.scores[index]
        data.append(item)
    usage = {"prompt_tokens": result.tokens, "total_tokens": result.tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as floats, or as base64 of its little-endian float32 bytes (what OpenAI's client decodes)."""
    as_float32 = np.asarray(vector, dtype="<f4")
    if encoding_format == "base64":
        return base64.b64encode(as_float32.tobytes()).decode("ascii")
    return [float(value) for value in as_float32]


def models_response(names: list[str], created: int) -> dict[str, Any]:
    """``GET /v1/models``: the names a request's ``model`` may give."""
    data = [{"id": name, "object": "model", "created": created, "owned_by": "clip-worker"} for name in names]
    return {"object": "list", "data": data}
