"""Texts end to end against a real broker (``--texts``): images, texts and bad texts in; every id exactly
once across output and DLQ, text vectors equal to transformers' own text features; without the flag the
texts are dead-lettered as ``input_kind_disabled``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from kafka import KafkaProducer

from tests.support.kafka_helpers import collect, create_topics, produce, running_worker, worker_settings
from tests.support.schemas import validate_dlq_headers, validate_msgpack
from tests.support.tiny_clip import build_tiny_clip
from tests.support.tiny_siglip import TINY_SIGLIP_TEXT_LENGTH, build_tiny_siglip
from worker.config import Settings
from worker.devtools.samples import sample_images
from worker.inference.embedder import Embedder, ModelSpec, load_embedder
from worker.messages import encode_text_request

pytestmark = pytest.mark.integration

TEXTS = {
    "txt-dog": "a photo of a dog",
    "txt-cat": "A photo of a cat!",
    "txt-snow": "two dogs playing in the snow",
    "txt-x": "x",
    "txt-long": "the quick brown fox jumps over the lazy dog and a cat at the lighthouse at night, twice",
    "txt-city": "an aerial view of a city",
}
# Texts the envelope refuses, as raw request values: empty, not a string, too long, with an image too.
BAD_TEXTS = {
    "bad-empty": {"v": 1, "id": "bad-empty", "text": ""},
    "bad-bin": {"v": 1, "id": "bad-bin", "text": b"a photo"},
    "bad-long": {"v": 1, "id": "bad-long", "text": "a" * 16385},
    "bad-both": {"v": 1, "id": "bad-both", "text": "a dog", "image": b"\xff\xd8"},
}
# The reference's call per family: CLIPProcessor as documented; SigLIP as trained (padding="max_length").
REFERENCE_OPTIONS: dict[str, dict[str, object]] = {
    "CLIPModel": {"padding": True, "truncation": True},
    "SiglipModel": {"padding": "max_length", "max_length": TINY_SIGLIP_TEXT_LENGTH, "truncation": True},
}
FAMILIES: list[tuple[str, Callable[[Path], Path]]] = [
    ("CLIPModel", build_tiny_clip),
    ("SiglipModel", build_tiny_siglip),
]


def produce_texts(settings: Settings) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    for request_id, text in TEXTS.items():
        value = encode_text_request(request_id, text, {"n": request_id})
        producer.send(settings.input_topic, key=request_id.encode(), value=value)
    for request_id, payload in BAD_TEXTS.items():
        producer.send(settings.input_topic, key=request_id.encode(), value=msgpack.packb(payload))
    producer.flush()
    producer.close()


def reference_vectors(directory: Path, model_class: str, texts: list[str]) -> np.ndarray:
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(directory)
    model = getattr(transformers, model_class).from_pretrained(directory).eval()
    inputs = processor(text=texts, return_tensors="pt", **REFERENCE_OPTIONS[model_class])
    if model_class == "SiglipModel":  # trained without an attention mask (see worker/models/siglip.py)
        inputs = {"input_ids": inputs["input_ids"]}
    with torch.inference_mode():
        features = model.get_text_features(**inputs).pooler_output
    vectors: np.ndarray = torch.nn.functional.normalize(features, dim=-1).numpy()
    return vectors


@pytest.fixture(scope="module", params=FAMILIES, ids=[name for name, _ in FAMILIES])
def family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Embedder]:
    name, build = request.param
    directory = build(tmp_path_factory.mktemp(name))
    embedder = load_embedder(ModelSpec(model=str(directory), device="cpu"), texts=True)
    return name, directory, embedder


def test_images_texts_and_bad_texts_each_come_out_once_with_the_reference_text_vectors(
    kafka_bootstrap: str, family: tuple[str, Path, Embedder]
):
    model_class, directory, embedder = family
    settings = worker_settings(kafka_bootstrap, texts=True, batch_size=4)
    create_topics(settings, partitions=2)
    images = [(s.name, s.data) for s in sample_images(10)]
    produce(settings, images[:5])
    produce_texts(settings)
    produce(settings, images[5:])
    expected = len(images) + len(TEXTS) + len(BAD_TEXTS)
    with running_worker(settings, embedder) as worker:
        results = collect(settings, expected=expected, timeout_s=120, settle_s=1.0)

    all_ids = [record["id"] for record in results.outputs] + results.dlq_keys()
    assert Counter(all_ids) == Counter([name for name, _ in images] + list(TEXTS) + list(BAD_TEXTS))
    assert results.reasons() == dict.fromkeys(BAD_TEXTS, "invalid_envelope")
    for message in results.dead:
        validate_dlq_headers(list(message.headers))
    for raw in results.raw_outputs:
        validate_msgpack(raw, "image-embedding.schema.json")

    by_id = {record["id"]: record for record in results.outputs}
    ids = list(TEXTS)
    reference = reference_vectors(directory, model_class, [TEXTS[i] for i in ids])
    ours = np.stack([by_id[i]["embedding"] for i in ids])
    assert float(np.abs(ours - reference).max()) < 1e-5, "the worker's text vectors are transformers'"
    assert all(by_id[i]["kind"] == "text" and by_id[i]["meta"] == {"n": i} for i in ids)
    assert all(by_id[name]["kind"] == "image" for name, _ in images)
    assert {by_id[i]["dim"] for i in by_id} == {embedder.dim}, "texts and images share the space"
    assert worker.metrics.texts_embedded._value.get() == len(TEXTS)
    assert worker.metrics.embedded._value.get() == len(images), "images_embedded counts images only"


def test_without_texts_texts_are_dead_lettered_as_input_kind_disabled(
    kafka_bootstrap: str, tiny_embedder: Embedder
):
    settings = worker_settings(kafka_bootstrap, batch_size=4)
    create_topics(settings)
    images = [(s.name, s.data) for s in sample_images(3)]
    produce(settings, images)
    produce_texts(settings)
    expected = len(images) + len(TEXTS) + len(BAD_TEXTS)
    with running_worker(settings, tiny_embedder):
        results = collect(settings, expected=expected, timeout_s=60, settle_s=1.0)
    assert sorted(record["id"] for record in results.outputs) == sorted(name for name, _ in images)
    reasons = results.reasons()
    assert {key: reasons[key] for key in TEXTS} == dict.fromkeys(TEXTS, "input_kind_disabled")
    assert {key: reasons[key] for key in BAD_TEXTS} == dict.fromkeys(BAD_TEXTS, "invalid_envelope")
    disabled = next(m for m in results.dead if m.key == b"txt-dog")
    assert b"--texts" in dict(m for m in disabled.headers)["clip-worker-error"]
