"""Texts through the loop (``--texts``): batched apart from images, embedded by the text tower with the same
retry, split and dead-letter path, published with ``kind: text``; refused without the flag."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from tests.support.recording_publisher import RecordingPublisher
from tests.support.schemas import validate_msgpack
from tests.support.stub_embedder import IMAGE_VALUE, TEXT_VALUE, StubEmbedder, StubPending
from tests.unit.test_pipeline import TP, add_images, build, run_until, running
from worker.config import load_settings
from worker.errors import RejectReason, StartupError
from worker.imaging.host import ImageLimits, Preprocessing
from worker.inference.stage import InferenceStage
from worker.intake.batcher import Batch, CloseCause
from worker.intake.stage import Ready, ReadyText
from worker.messages import (
    ERROR_HEADER,
    REASON_HEADER,
    Request,
    Source,
    decode_embedding,
    encode_embedding,
    encode_text_request,
)
from worker.models.text import TokenizedText
from worker.ops.metrics import WorkerMetrics
from worker.work import InputRecord


def add_texts(consumer: object, texts: Sequence[str], prefix: str = "txt") -> None:
    for index, text in enumerate(texts):
        key = f"{prefix}-{index}".encode()
        consumer.add("images", encode_text_request(key.decode(), text), key=key)  # type: ignore[attr-defined]


def outputs_of(producer: object) -> dict[str, dict[str, Any]]:
    sent = producer.to("image-embeddings")  # type: ignore[attr-defined]
    return {output["id"]: output for output in (decode_embedding(s.value or b"") for s in sent)}


def test_texts_and_images_are_batched_apart_and_each_embedded_by_its_own_tower():
    embedder = StubEmbedder(texts=True)
    pipeline, consumer, producer = build(embedder=embedder, texts=True)
    add_images(consumer, 3)
    add_texts(consumer, ["a photo of a dog", "a cat", "two dogs", "a lighthouse", "snow"])
    add_images(consumer, 2)  # same ids again: only their count matters here
    with running(pipeline):
        run_until(pipeline, lambda: consumer.committed.get(TP) == 10)
    assert sum(size for kind, size in embedder.batches if kind == "image") == 5
    assert sum(size for kind, size in embedder.batches if kind == "text") == 5
    outputs = outputs_of(producer)
    for index in range(5):
        text = outputs[f"txt-{index}"]
        assert text["kind"] == "text" and np.all(text["embedding"] == TEXT_VALUE), "texts: the text tower"
        assert "text" not in text and "image" not in text
    assert outputs["img-0"]["kind"] == "image" and np.all(outputs["img-0"]["embedding"] == IMAGE_VALUE)
    metrics = pipeline.metrics
    assert metrics.embedded._value.get() == 5, "images_embedded counts images only"
    assert metrics.texts_embedded._value.get() == 5
    assert metrics.text_batch_size._sum.get() == 5
    assert metrics.batch_size._sum.get() == 5


def test_a_partial_batch_of_texts_closes_on_its_own_timeout():
    embedder = StubEmbedder(texts=True)
    pipeline, consumer, _producer = build(embedder=embedder, texts=True, batch_timeout_ms=20)
    add_texts(consumer, ["one", "two"])
    with running(pipeline):
        run_until(pipeline, lambda: consumer.committed.get(TP) == 2)
    assert embedder.batches == [("text", 2)]
    assert pipeline.metrics.text_batch_closes.labels("timeout")._value.get() == 1
    assert pipeline.metrics.batch_closes.labels("timeout")._value.get() == 0


def test_without_texts_a_text_is_dead_lettered_with_the_flag_that_enables_it():
    pipeline, consumer, producer = build()
    add_texts(consumer, ["a photo of a dog"])
    with running(pipeline):
        run_until(pipeline, lambda: consumer.committed.get(TP) == 1)
    [dead] = producer.to("images.dlq")
    assert dead.header_map[REASON_HEADER] == b"input_kind_disabled"
    assert b"--texts" in dead.header_map[ERROR_HEADER]


def test_an_empty_text_is_an_invalid_envelope_even_with_texts():
    pipeline, consumer, producer = build(embedder=StubEmbedder(texts=True), texts=True)
    consumer.add("images", encode_text_request("fine", "a dog"), key=b"fine")
    consumer.add("images", msgpack.packb({"v": 1, "id": "empty", "text": ""}), key=b"empty")
    with running(pipeline):
        run_until(pipeline, lambda: consumer.committed.get(TP) == 2)
    [dead] = producer.to("images.dlq")
    assert dead.key == b"empty" and dead.header_map[REASON_HEADER] == b"invalid_envelope"
    assert list(outputs_of(producer)) == ["fine"]


def test_texts_need_the_text_tower_loaded():
    with pytest.raises(StartupError, match="--texts"):
        build(embedder=StubEmbedder(texts=False), texts=True)


class FailingTexts(StubEmbedder):
    """Fails any batch of texts holding one of length ``poison`` (the stub tokenizer's first id)."""

    def __init__(self, poison: int) -> None:
        super().__init__(texts=True)
        self.poison = poison

    def launch_texts(self, texts: Sequence[TokenizedText]) -> StubPending:
        if any(int(text.ids[0]) == self.poison for text in texts):
            raise RuntimeError("injected text tower failure")
        return super().launch_texts(texts)


def test_a_text_that_fails_alone_is_dead_lettered_as_inference_failed_and_the_rest_published():
    embedder = FailingTexts(poison=len("poison"))
    publisher = RecordingPublisher()
    stage = InferenceStage(embedder, publisher, WorkerMetrics(), Preprocessing(), ImageLimits())  # type: ignore[arg-type]
    assert embedder.text is not None
    texts = ["alpha", "beta", "poison", "delta"]
    items: list[Ready] = []
    for offset, (text, tokens) in enumerate(zip(texts, embedder.text.tokenize(texts), strict=True)):
        record = InputRecord(Source("in", 0, offset), text.encode(), b"", [], 0, time.monotonic())
        items.append(ReadyText(record, Request(text, text=text), tokens))
    stage.start()
    assert stage.offer(Batch(items, CloseCause.SIZE), wait_s=1)
    stage.stop(time.monotonic() + 5)
    assert sorted(publisher.ids) == ["alpha", "beta", "delta"]
    assert all(published.scores is None for published in publisher.published), "texts are not scored"
    [(key, why)] = publisher.dead
    assert key == "poison" and why.reason is RejectReason.INFERENCE_FAILED
    assert all(kind == "text" for kind, _ in embedder.batches)


def test_a_text_output_names_its_kind_matches_the_schema_and_forwards_no_image():
    request = Request("q1", text="a photo of a dog", meta={"lang": "en"})
    value = encode_embedding(request, np.ones(4, np.float32) / 2, "m", Source("t", 0, 1), forward_image=True)
    decoded = validate_msgpack(value, "image-embedding.schema.json")
    assert decoded["kind"] == "text" and "image" not in decoded and decoded["meta"] == {"lang": "en"}
    image = encode_embedding(Request("i1", b"jpeg"), np.ones(4, np.float32) / 2, "m", Source("t", 0, 2), True)
    decoded = validate_msgpack(image, "image-embedding.schema.json")
    assert decoded["kind"] == "image" and decoded["image"] == b"jpeg"


def test_a_text_request_matches_the_request_schema():
    validate_msgpack(encode_text_request("q1", "a photo of a dog", {"k": 1}), "image-request.schema.json")


def test_texts_is_a_flag_and_an_environment_variable():
    assert load_settings({"texts": True}, environ={}).texts
    assert load_settings({}, environ={"CLIP_WORKER_TEXTS": "true"}).texts
    assert not load_settings({}, environ={}).texts
    with pytest.raises(StartupError, match="--texts / CLIP_WORKER_TEXTS"):
        load_settings({}, environ={"CLIP_WORKER_TEXTS": "perhaps"})


def test_a_text_the_tokenizer_fails_on_is_rejected_alone():
    from tests.support.stub_embedder import STUB_TEXT_LENGTH, stub_tokenizer
    from worker.errors import RejectedRecord
    from worker.intake.inputs.text import TextTokenizer
    from worker.models.text import TextTower

    def picky(texts: list[str], **options: Any) -> dict[str, np.ndarray]:
        if "\x00" in "".join(texts):
            raise ValueError("cannot tokenise NUL")
        return stub_tokenizer(texts, **options)

    tower = TextTower(None, picky, STUB_TEXT_LENGTH, lambda *_: torch.zeros(0))
    handler = TextTokenizer(tower, WorkerMetrics())
    try:
        slots = handler.submit(
            [Request(f"t{i}", text=text) for i, text in enumerate(["ok", "bad\x00", "fine"])]
        )
        results = [slot.future.result(timeout=5)[slot.index] for slot in slots]
    finally:
        handler.shutdown()
    assert isinstance(results[0], TokenizedText) and isinstance(results[2], TokenizedText)
    assert isinstance(results[1], RejectedRecord) and results[1].reason.value == "inference_failed"
