"""An image that makes inference fail is isolated by splitting its batch; the partition keeps moving."""

import io
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.kafka_helpers import (
    collect,
    committed_offsets,
    create_topics,
    produce,
    running_worker,
    worker_settings,
)
from worker.devtools.samples import jpeg_corpus
from worker.inference.embedder import Embedder, PendingEmbeddings
from worker.models.heads import ScoreHeads

pytestmark = pytest.mark.integration


class FailedResult(PendingEmbeddings):
    """Vectors that never arrive: the asynchronous device error surfaces when they are awaited."""

    def __init__(self) -> None:
        super().__init__(torch.empty(0), None)

    def result(self) -> np.ndarray:
        raise RuntimeError("injected asynchronous inference failure")


class PoisonedEmbedder(Embedder):
    """The tiny model, except that any batch holding an all-white image fails, as a bad kernel would:
    when it is launched, or only when its vectors are awaited (as an asynchronous CUDA error does)."""

    def __init__(self, inner: Embedder, fails_at: str) -> None:
        super().__init__(
            inner.model, inner.label, inner.revision, inner.preprocessing, inner.device, inner.dtype
        )
        self.fails_at = fails_at
        self.calls = 0

    def launch(
        self, pixels: np.ndarray | Sequence[np.ndarray], heads: ScoreHeads | None = None
    ) -> PendingEmbeddings:
        self.calls += 1
        white = (1.0 - np.asarray(self.preprocessing.mean)) / np.asarray(self.preprocessing.std)
        if not any(np.allclose(image[:, 0, 0], white, atol=1e-3) for image in pixels):
            return super().launch(pixels, heads)
        if self.fails_at == "launch":
            raise RuntimeError("injected inference failure")
        return FailedResult()


def white_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 255, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("fails_at", ["launch", "result"])
def test_poison_image_is_dead_lettered_and_the_rest_embedded(kafka_bootstrap, tiny_embedder, fails_at):
    settings = worker_settings(kafka_bootstrap, batch_size=16, batch_timeout_ms=500)
    create_topics(settings)
    items = [(f"ok-{i:02d}.jpg", data) for i, data in enumerate(jpeg_corpus(15, 96, 64))]
    items.insert(7, ("poison.png", white_png()))
    produce(settings, items)
    embedder = PoisonedEmbedder(tiny_embedder, fails_at)
    with running_worker(settings, embedder):
        results = collect(settings, expected=16, timeout_s=60)
    assert sorted(r["id"] for r in results.outputs) == sorted(
        name for name, _ in items if name != "poison.png"
    )
    assert results.reasons() == {"poison.png": "inference_failed"}
    assert embedder.calls > 2, "the batch was retried and split"
    assert committed_offsets(settings, 1) == {0: 16}
