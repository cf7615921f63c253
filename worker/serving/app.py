"""The routes: ``POST /v1/embeddings`` (texts, or images with ``modality``), ``GET /v1/models``,
``/healthz``, ``/readyz`` and ``/metrics``, every answer counted by endpoint and status."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from worker.serving.api import (
    ApiError,
    EmbeddingRequest,
    embedding_response,
    invalid,
    models_response,
    parse_request,
    rejection_error,
)
from worker.serving.engine import EmbeddingEngine, InputFailed, QueueFull, Unavailable
from worker.serving.images import ImageInput, parse_image
from worker.serving.limits import ServeLimits
from worker.serving.metrics import ServeMetrics

log = logging.getLogger(__name__)

_OFF_LOOP_BYTES = 1024 * 1024
CLIENT_CLOSED = 499  # counted for a client that disconnected mid-request (nginx's code; never sent)
_Large = TypeVar("_Large", bytes, list[str])
_Limit = TypeVar("_Limit")
_Result = TypeVar("_Result")

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class ServedModel:
    """The names a request's ``model`` may give (the first is the one answers carry) and its dimensions."""

    names: tuple[str, ...]
    dim: int
    created: int


def build_app(
    engine: EmbeddingEngine,
    model: ServedModel,
    limits: ServeLimits,
    metrics: ServeMetrics,
    registry: CollectorRegistry,
) -> Starlette:
    """The ASGI application of ``clip-worker serve``."""

    async def embeddings(request: Request) -> Response:
        parsed = await _embedding_request(request, limits)
        if parsed.model is not None and parsed.model not in model.names:
            raise ApiError(
                404,
                f"the model {parsed.model!r} is not served here; GET /v1/models lists "
                f"{', '.join(model.names)}",
                "model_not_found",
                "model",
            )
        if parsed.dimensions is not None and parsed.dimensions != model.dim:
            raise invalid(
                f"this model's embeddings have {model.dim} dimensions and its family was not trained to be "
                "cut shorter (no Matryoshka heads): drop 'dimensions'",
                "dimensions",
                "dimensions_not_supported",
            )
        encoding_format, inputs, modality = parsed.encoding_format, parsed.inputs, parsed.modality
        del parsed  # only the inputs are held while the request waits for its vectors
        try:
            if modality == "image":
                images = await _off_loop_if_large(_images, inputs, limits.max_image_bytes)
                del inputs  # the base64 text, once decoded
                result = await engine.embed_images(images)
            else:
                result = await engine.embed_texts(inputs)
        except QueueFull as exc:
            raise ApiError(
                429,
                f"the server is busy ({exc}); retry after {limits.retry_after_s}s",
                "queue_full",
                error_type="rate_limit_error",
                headers={"Retry-After": str(limits.retry_after_s)},
            ) from None
        except Unavailable as exc:
            raise ApiError(503, f"not taking requests: {exc}", "unavailable") from None
        except InputFailed as exc:
            raise rejection_error(exc.index, exc.rejection) from None
        return JSONResponse(embedding_response(result, model.names[0], encoding_format))

    async def models(_request: Request) -> Response:
        return JSONResponse(models_response(list(model.names), model.created))

    async def healthz(_request: Request) -> Response:
        problem = engine.problem()
        if problem is not None and not problem.startswith("draining"):
            return PlainTextResponse(f"not alive: {problem}\n", 503)
        return PlainTextResponse("ok\n")

    async def readyz(_request: Request) -> Response:
        problem = engine.problem()
        if problem is not None:
            return PlainTextResponse(f"not ready: {problem}\n", 503)
        return PlainTextResponse("ready\n")

    async def scrape(_request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def counted(endpoint: str, handler: Handler) -> Handler:
        async def answer(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except ApiError as exc:
                response = error_response(exc)
            except ClientDisconnect:  # the client went away mid-upload: nobody to answer, nothing broken
                log.debug("serve: the client of %s disconnected before its request was read", endpoint)
                response = Response(status_code=CLIENT_CLOSED)
            except Exception as exc:  # a bug: answered in OpenAI's shape, logged with its traceback
                log.exception("serve: %s failed", endpoint)
                response = error_response(ApiError(500, f"internal error: {type(exc).__name__}", "internal"))
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
            metrics.seconds.labels(endpoint).observe(time.perf_counter() - started)
            return response

        return answer

    routes = [
        Route("/v1/embeddings", counted("embeddings", embeddings), methods=["POST"]),
        Route("/embeddings", counted("embeddings", embeddings), methods=["POST"]),
        Route("/v1/models", counted("models", models), methods=["GET"]),
        Route("/models", counted("models", models), methods=["GET"]),
        Route("/healthz", counted("healthz", healthz), methods=["GET"]),
        Route("/readyz", counted("readyz", readyz), methods=["GET"]),
        Route("/metrics", counted("metrics", scrape), methods=["GET"]),
    ]

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        metrics.requests.labels("other", str(exc.status_code)).inc()
        headers = dict(exc.headers or {})  # a 405's Allow
        return error_response(
            ApiError(exc.status_code, str(exc.detail), _status_code_name(exc.status_code), headers=headers)
        )

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def _status_code_name(status: int) -> str:
    """The error ``code`` of a status starlette answers itself: 404 not_found, 405 method_not_allowed."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


def error_response(error: ApiError) -> Response:
    """An :class:`ApiError` as its JSON answer."""
    return JSONResponse(error.body(), error.status, headers=error.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it passes ``limit`` bytes (declared or received)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"the request body is larger than {limit} bytes (--serve-max-request-bytes)", "body_too_large"
    )


async def _embedding_request(request: Request, limits: ServeLimits) -> EmbeddingRequest:
    """The request's body read, parsed and checked; the body itself is not kept."""
    body = await _read_body(request, limits.max_request_bytes)
    return await _off_loop_if_large(_parse_request, body, limits)


def _parse_request(body: bytes, limits: ServeLimits) -> EmbeddingRequest:
    return parse_request(_parse_json(body), limits)


def _images(inputs: list[str], max_bytes: int) -> list[ImageInput]:
    return [parse_image(text, index, max_bytes) for index, text in enumerate(inputs)]


async def _off_loop_if_large(
    work: Callable[[_Large, _Limit], _Result], data: _Large, limit: _Limit
) -> _Result:
    """``work(data, limit)``, on a worker thread when ``data`` is large: parsing or decoding megabytes on
    the event loop would stall every other request meanwhile."""
    size = len(data) if isinstance(data, bytes) else sum(len(text) for text in data)
    if size > _OFF_LOOP_BYTES:
        return await asyncio.to_thread(work, data, limit)
    return work(data, limit)


def _parse_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise invalid("the body is not JSON: send a JSON object with 'input'") from None
    except RecursionError:  # nested deeper than the parser's stack allows: no request of this API is
        raise invalid("the body nests too deeply: send a JSON object with 'input'") from None
