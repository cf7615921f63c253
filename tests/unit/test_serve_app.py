"""serve in-process on the tiny model: texts and images come back as the worker's own stages embed them, the
model, health and metrics endpoints answer, concurrent requests share batches, and a full queue is a 429."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest
from starlette.testclient import TestClient

from tests.support.stub_embedder import StubEmbedder
from worker.config import Settings, load_settings
from worker.devtools.samples import sample_images
from worker.errors import RejectReason
from worker.imaging.host import ImageLimits, prepare
from worker.inference.embedder import Embedder, ModelSpec, PendingEmbeddings, load_embedder
from worker.intake.inputs.base import Outcome, Slot
from worker.messages import Request
from worker.models.text import TokenizedText
from worker.ops.metrics import WorkerMetrics
from worker.serving.api import Embeddings, rejection_error
from worker.serving.app import ServedModel, build_app
from worker.serving.engine import (
    EmbeddingEngine,
    InputFailed,
    QueueFull,
    Unavailable,
    _Answer,
    with_serve_fetch_default,
)
from worker.serving.limits import ServeLimits
from worker.serving.metrics import ServeMetrics


@pytest.fixture(scope="module")
def text_embedder(tiny_clip_dir: Path) -> Embedder:
    return load_embedder(ModelSpec(model=str(tiny_clip_dir), device="cpu"), texts=True)


def serve_settings(tiny_clip_dir: Path, **overrides: Any) -> Settings:
    given = {"model": str(tiny_clip_dir), "device": "cpu", "batch_timeout_ms": 5, **overrides}
    return load_settings(given, environ={})


class Served:
    """An engine and its app around an embedder, as `serve` builds them."""

    def __init__(self, settings: Settings, embedder: Embedder, batch_size: int = 8) -> None:
        self.metrics = WorkerMetrics()
        self.serve_metrics = ServeMetrics(self.metrics.registry)
        self.engine = EmbeddingEngine(settings, embedder, self.metrics, self.serve_metrics, batch_size, 1)
        self.model = ServedModel(("tiny", embedder.label), embedder.dim, 0)
        self.app = build_app(
            self.engine,
            self.model,
            ServeLimits.from_settings(settings),
            self.serve_metrics,
            self.metrics.registry,
        )
        self.engine.start()

    def close(self) -> None:
        self.engine.close(time.monotonic() + 10)


@pytest.fixture
def served(tiny_clip_dir: Path, text_embedder: Embedder) -> Iterator[Served]:
    running = Served(serve_settings(tiny_clip_dir), text_embedder)
    yield running
    running.close()


@pytest.fixture
def client(served: Served) -> TestClient:
    return TestClient(served.app)


def test_texts_come_back_as_the_text_tower_embeds_them(client: TestClient, text_embedder: Embedder):
    texts = ["a photo of a dog", "a cat", "two dogs playing in the snow"]
    answer = client.post("/v1/embeddings", json={"input": texts, "model": "tiny"})
    assert answer.status_code == 200
    body = answer.json()
    assert body["object"] == "list" and body["model"] == "tiny"
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    vectors = np.array([item["embedding"] for item in body["data"]], dtype=np.float32)
    assert np.abs(vectors - text_embedder.embed_texts(texts)).max() <= 1e-6
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(texts)


def test_base64_answers_hold_the_same_vectors(client: TestClient):
    floats = client.post("/v1/embeddings", json={"input": "a dog"}).json()["data"][0]["embedding"]
    encoded = client.post("/v1/embeddings", json={"input": "a dog", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(encoded["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, np.array(floats, dtype=np.float32))


def test_images_by_data_uri_come_back_as_the_worker_prepares_and_embeds_them(
    client: TestClient, text_embedder: Embedder
):
    images = [sample.data for sample in sample_images(3)]
    inputs = [f"data:image/jpeg;base64,{base64.b64encode(images[0]).decode()}"]
    inputs += [base64.b64encode(data).decode() for data in images[1:]]
    answer = client.post("/v1/embeddings", json={"input": inputs, "modality": "image"})
    assert answer.status_code == 200, answer.text
    vectors = np.array([item["embedding"] for item in answer.json()["data"]], dtype=np.float32)
    preprocessing = replace(text_embedder.preprocessing, resize="torch")
    prepared = [prepare(data, ImageLimits(), preprocessing) for data in images]
    pixels = np.stack([p for p in prepared if isinstance(p, np.ndarray)])
    assert np.abs(vectors - text_embedder.embed(pixels)).max() <= 1e-6


def test_an_image_the_worker_would_dead_letter_is_a_422_naming_its_input(client: TestClient):
    good = base64.b64encode(sample_images(1)[0].data).decode()
    bad = base64.b64encode(b"GIF89a but not really").decode()
    answer = client.post("/v1/embeddings", json={"input": [good, bad], "modality": "image"})
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] in {"not_an_image", "truncated_image", "corrupt_image"}
    assert answer.json()["error"]["message"].startswith("input[1]")


def test_models_lists_the_served_names_and_an_unknown_model_is_a_404(client: TestClient, served: Served):
    listed = client.get("/v1/models").json()
    assert [model["id"] for model in listed["data"]] == list(served.model.names)
    answer = client.post("/v1/embeddings", json={"input": "a", "model": "text-embedding-3-small"})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"


def test_dimensions_other_than_the_models_own_are_refused(client: TestClient, served: Served):
    assert (
        client.post("/v1/embeddings", json={"input": "a", "dimensions": served.model.dim}).status_code == 200
    )
    answer = client.post("/v1/embeddings", json={"input": "a", "dimensions": 8})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "dimensions"


def test_bodies_that_are_not_json_or_too_large_are_refused(tiny_clip_dir: Path, text_embedder: Embedder):
    running = Served(serve_settings(tiny_clip_dir, serve_max_request_bytes=2048), text_embedder)
    try:
        client = TestClient(running.app)
        assert client.post("/v1/embeddings", content=b"{not json").status_code == 400
        answer = client.post("/v1/embeddings", json={"input": "a" * 4000})
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "body_too_large"
    finally:
        running.close()


def test_health_metrics_and_unknown_paths(client: TestClient, served: Served):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").text == "ready\n"
    client.post("/v1/embeddings", json={"input": "a"})
    client.post("/v1/embeddings", json={"input": []})
    assert client.get("/nowhere").json()["error"]["code"] == "not_found"
    scraped = client.get("/metrics").text
    assert 'clip_worker_serve_requests_total{endpoint="embeddings",status="200"} 1.0' in scraped
    assert 'clip_worker_serve_requests_total{endpoint="embeddings",status="400"} 1.0' in scraped
    assert "clip_worker_serve_request_seconds_bucket" in scraped
    assert "clip_worker_batch_size_texts_count 1.0" in scraped
    assert "clip_worker_serve_queued_inputs 0.0" in scraped
    served.close()
    assert client.get("/readyz").status_code == 503
    assert client.post("/v1/embeddings", json={"input": "a"}).status_code == 503


def test_concurrent_requests_share_a_batch(tiny_clip_dir: Path, text_embedder: Embedder):
    running = Served(serve_settings(tiny_clip_dir, batch_timeout_ms=10_000), text_embedder, batch_size=8)

    async def eight() -> None:
        await asyncio.gather(*(running.engine.embed_texts([f"text {n}"]) for n in range(8)))

    try:
        asyncio.run(asyncio.wait_for(eight(), timeout=30))
        assert running.metrics.text_batch_closes.labels("size")._value.get() == 1
        assert running.metrics.text_batch_size._sum.get() == 8
    finally:
        running.close()


class GatedEmbedder(Embedder):
    """The tiny embedder, whose text batches wait for :attr:`gate`."""

    gate = threading.Event()

    def launch_texts(self, texts: Any) -> PendingEmbeddings:
        self.gate.wait(30)
        return super().launch_texts(texts)


def test_a_full_queue_refuses_at_once_and_takes_requests_again_once_answered(
    tiny_clip_dir: Path, text_embedder: Embedder
):
    gated = GatedEmbedder(
        text_embedder.model,
        text_embedder.label,
        text_embedder.revision,
        text_embedder.preprocessing,
        text_embedder.device,
        text_embedder.dtype,
        text_embedder.family,
        text_embedder.text,
    )
    gated.gate.clear()
    running = Served(
        serve_settings(tiny_clip_dir, serve_max_queue=3, serve_max_inputs=3), gated, batch_size=2
    )

    async def scenario() -> None:
        first = asyncio.create_task(running.engine.embed_texts(["a", "b"]))
        await asyncio.sleep(0)
        assert running.engine.queued == 2
        with pytest.raises(QueueFull):
            await running.engine.embed_texts(["c", "d"])
        gated.gate.set()
        assert len((await first).vectors) == 2
        assert running.engine.queued == 0
        assert len((await running.engine.embed_texts(["c", "d", "e"])).vectors) == 3

    try:
        asyncio.run(asyncio.wait_for(scenario(), timeout=30))
        assert running.serve_metrics.refused._value.get() == 2
    finally:
        gated.gate.set()
        running.close()


def test_a_429_carries_retry_after(tiny_clip_dir: Path, text_embedder: Embedder):
    running = Served(serve_settings(tiny_clip_dir, serve_max_queue=2, serve_max_inputs=2), text_embedder)
    try:
        with running.engine._lock:  # the queue held full by requests under way
            running.engine._queued = 2
        answer = TestClient(running.app).post("/v1/embeddings", json={"input": "a"})
        assert answer.status_code == 429 and answer.headers["retry-after"] == "1"
        assert answer.json()["error"]["type"] == "rate_limit_error"
    finally:
        with running.engine._lock:
            running.engine._queued = 0
        running.close()


def test_tokens_count_without_padding(text_embedder: Embedder):
    from worker.serving.engine import _token_count

    assert text_embedder.text is not None
    short, long = text_embedder.text.tokenize(["a", "a b c d e"])
    assert isinstance(short, TokenizedText) and _token_count(short) < _token_count(long)


class InferenceThreadKilled(BaseException):
    """Not an Exception: no retry or split catches it, so the inference thread dies of it."""


def test_a_request_admitted_when_the_inference_thread_dies_is_a_503_not_a_hang(tiny_clip_dir: Path):
    embedder = StubEmbedder(texts=True)
    embedder.dies = InferenceThreadKilled("killed")
    running = Served(serve_settings(tiny_clip_dir), embedder)  # type: ignore[arg-type]
    try:
        with pytest.raises(Unavailable, match="inference thread died"):
            asyncio.run(asyncio.wait_for(running.engine.embed_texts(["a", "b"]), timeout=10))
        assert running.engine.queued == 0
        answer = TestClient(running.app).post("/v1/embeddings", json={"input": "c"})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "unavailable"
        assert TestClient(running.app).get("/readyz").status_code == 503
    finally:
        running.close()


def test_an_answer_finishing_after_its_loop_closed_is_dropped_quietly():
    loop = asyncio.new_event_loop()
    answers = [_Answer(1, loop), _Answer(1, loop)]
    loop.close()
    answers[0].vector(0, np.ones(4, np.float32), None)  # on the inference thread: it must not die of it
    answers[1].fail(Unavailable("stopped"))


def prepared_as(engine: EmbeddingEngine, future: Future[list[Outcome]]) -> Embeddings:
    """The answer to an image request whose decode ends in ``future``."""

    async def scenario() -> Embeddings:
        answer, items = engine._admit([Request(id="", image=b"\xff\xd8")])
        engine._prepare(items, [Slot(future, 0)])
        if not future.done():
            future.cancel()
        return await asyncio.wait_for(answer.future, timeout=10)

    return asyncio.run(scenario())


def test_a_handler_that_crashes_on_an_input_is_a_corrupt_image_as_on_the_kafka_path(served: Served):
    crashed: Future[list[Outcome]] = Future()
    crashed.set_result([ValueError("boom")])
    with pytest.raises(InputFailed) as caught:
        prepared_as(served.engine, crashed)
    assert caught.value.rejection.reason is RejectReason.CORRUPT_IMAGE
    assert rejection_error(0, caught.value.rejection).status == 422
    assert served.engine.queued == 0


def test_an_input_whose_handler_stopped_under_it_is_a_503(served: Served):
    with pytest.raises(Unavailable, match="stopping"):
        prepared_as(served.engine, Future())
    assert served.engine.queued == 0


def test_json_nested_past_the_parsers_stack_is_a_400(client: TestClient):
    answer = client.post("/v1/embeddings", content=b"[" * 200_000 + b"]" * 200_000)
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"


def test_uvicorn_gets_the_shutdown_grace_as_given(tiny_clip_dir: Path, served: Served):
    from worker.serving.server import uvicorn_config

    settings = serve_settings(tiny_clip_dir, shutdown_grace_s=0.5)
    assert uvicorn_config(served.app, settings).timeout_graceful_shutdown == 0.5


def test_draining_refuses_new_requests_and_embeds_open_batches_at_once(
    tiny_clip_dir: Path, text_embedder: Embedder
):
    running = Served(serve_settings(tiny_clip_dir, batch_timeout_ms=600_000), text_embedder)

    async def scenario() -> None:
        waiting = asyncio.create_task(running.engine.embed_texts(["a"]))
        while running.engine.queued == 0:
            await asyncio.sleep(0.01)
        draining = asyncio.create_task(asyncio.to_thread(running.engine.drain, time.monotonic() + 30))
        assert len((await asyncio.wait_for(waiting, timeout=10)).vectors) == 1
        await draining
        assert (running.engine.problem() or "").startswith("draining")
        with pytest.raises(Unavailable):
            await running.engine.embed_texts(["b"])

    try:
        asyncio.run(asyncio.wait_for(scenario(), timeout=30))
        assert TestClient(running.app).get("/readyz").status_code == 503
        assert TestClient(running.app).get("/healthz").status_code == 200
    finally:
        running.close()


def test_inline_images_past_the_byte_budget_are_a_429_and_their_bytes_come_back(
    tiny_clip_dir: Path, text_embedder: Embedder
):
    settings = serve_settings(
        tiny_clip_dir, serve_max_request_bytes=1 << 20, serve_max_queued_image_bytes=1 << 21
    )
    running = Served(settings, text_embedder)
    image = base64.b64encode(sample_images(1)[0].data).decode()
    try:
        client = TestClient(running.app)
        assert client.post("/v1/embeddings", json={"input": image, "modality": "image"}).status_code == 200
        assert running.engine.queued_image_bytes == 0
        with running.engine._lock:  # images under way hold the budget nearly full
            running.engine._image_bytes = (1 << 21) - 10
        answer = client.post("/v1/embeddings", json={"input": image, "modality": "image"})
        assert answer.status_code == 429 and answer.headers["retry-after"] == "1"
        assert "--serve-max-queued-image-bytes" in answer.json()["error"]["message"]
        assert client.post("/v1/embeddings", json={"input": "a text holds none"}).status_code == 200
    finally:
        with running.engine._lock:
            running.engine._image_bytes = 0
        running.close()


def test_a_large_body_is_parsed_off_the_event_loop_with_the_same_answer(client: TestClient):
    padding = "x" * (1 << 20)
    answer = client.post("/v1/embeddings", json={"input": "a dog", "user": padding})
    assert answer.status_code == 200
    assert (
        answer.json()["data"][0]["embedding"]
        == client.post("/v1/embeddings", json={"input": "a dog"}).json()["data"][0]["embedding"]
    )


def test_serve_fetches_only_https_unless_told_otherwise(tiny_clip_dir: Path, client: TestClient):
    assert with_serve_fetch_default(serve_settings(tiny_clip_dir)).fetch_scheme_set == {"https"}
    chosen = serve_settings(tiny_clip_dir, fetch_schemes="https,s3")
    assert with_serve_fetch_default(chosen).fetch_scheme_set == {"https", "s3"}
    for uri in ("s3://bucket/key.jpg", "http://example.com/a.jpg"):
        answer = client.post("/v1/embeddings", json={"input": uri, "modality": "image"})
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "fetch_forbidden"


def test_a_method_a_path_does_not_take_is_a_405_with_allow(client: TestClient):
    answer = client.get("/v1/embeddings")
    assert answer.status_code == 405 and answer.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in answer.headers["allow"]


def test_a_client_gone_mid_upload_is_no_500_and_no_traceback(
    served: Served, caplog: pytest.LogCaptureFixture
):
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"input": "a d', "more_body": True},
        {"type": "http.disconnect"},
    ]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/embeddings", "raw_path": b"/v1/embeddings", "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json")], "server": ("test", 80), "client": ("c", 1),
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(_message: Any) -> None:
        pass

    asyncio.run(served.app(scope, receive, send))
    scraped = generate_latest(served.metrics.registry).decode()
    assert 'endpoint="embeddings",status="499"} 1.0' in scraped
    assert 'status="500"' not in scraped and "Traceback" not in caplog.text
