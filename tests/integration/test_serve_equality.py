"""The vectors of ``serve`` are the stream's: the same texts and images embedded through the Kafka worker and
through the ``serve`` process on the same checkpoint come out equal within 1e-6 in float32."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from kafka import KafkaProducer

from tests.support.kafka_helpers import collect, create_topics, produce, running_worker, worker_settings
from tests.support.serve_process import running_serve
from worker.devtools.samples import sample_images
from worker.inference.embedder import ModelSpec, load_embedder
from worker.messages import encode_text_request

pytestmark = pytest.mark.integration

TEXTS = {
    "q-dog": "a photo of a dog",
    "q-cat": "A photo of a cat!",
    "q-snow": "two dogs playing in the snow",
    "q-long": "the quick brown fox jumps over the lazy dog and a cat at the lighthouse at night, twice over",
}
TOLERANCE = 1e-6


def serve_vectors(url: str, inputs: list[str], modality: str) -> np.ndarray:
    answer = httpx.post(f"{url}/v1/embeddings", json={"input": inputs, "modality": modality}, timeout=60)
    assert answer.status_code == 200, answer.text
    return np.array([item["embedding"] for item in answer.json()["data"]], dtype=np.float32)


def test_serve_embeds_texts_and_images_as_the_kafka_worker_does(
    kafka_bootstrap: str, tiny_clip_dir: Path, tmp_path: Path, record_property: Callable[[str, object], None]
):
    images = [(sample.name, sample.data) for sample in sample_images(6)]
    settings = worker_settings(kafka_bootstrap, texts=True, batch_size=4)
    create_topics(settings)
    produce(settings, images)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    for request_id, text in TEXTS.items():
        producer.send(
            settings.input_topic, key=request_id.encode(), value=encode_text_request(request_id, text)
        )
    producer.flush()
    producer.close()
    embedder = load_embedder(ModelSpec(model=str(tiny_clip_dir), device="cpu"), texts=True)
    with running_worker(settings, embedder):
        results = collect(settings, expected=len(images) + len(TEXTS), timeout_s=120)
    stream = {record["id"]: np.asarray(record["embedding"], dtype=np.float32) for record in results.outputs}
    assert set(stream) == {name for name, _ in images} | set(TEXTS)

    with running_serve(tiny_clip_dir, tmp_path / "serve.log", "--batch-size", "3") as server:
        texts = serve_vectors(server.url, list(TEXTS.values()), "text")
        by_value = serve_vectors(server.url, [base64.b64encode(data).decode() for _, data in images], "image")

    expected_texts = np.stack([stream[request_id] for request_id in TEXTS])
    expected_images = np.stack([stream[name] for name, _ in images])
    text_gap, image_gap = np.abs(texts - expected_texts).max(), np.abs(by_value - expected_images).max()
    record_property("max_abs_difference", {"texts": float(text_gap), "images": float(image_gap)})
    assert text_gap <= TOLERANCE and image_gap <= TOLERANCE
    assert texts.shape[1] == by_value.shape[1] == embedder.dim
