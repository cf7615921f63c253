"""An embedder that costs nothing: every image gets the same unit vector. For unit tests of the loop.

With ``texts=True`` it also has a text tower (a real :class:`~worker.models.text.TextTower` around a stub
tokenizer) whose vectors differ from the images', and it records which modality each batch held.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from worker.imaging.host import Preprocessing
from worker.models.text import TextTower, TokenizedText

DIM = 4
IMAGE_VALUE, TEXT_VALUE = 0.5, 0.25  # every image's vector is full of the first, every text's of the second
STUB_TEXT_LENGTH = 4


class StubPending:
    """Vectors already computed."""

    def __init__(self, count: int, value: float = IMAGE_VALUE) -> None:
        self._count = count
        self._value = value

    def result(self) -> np.ndarray:
        return np.full((self._count, DIM), self._value, np.float32)

    def scores(self) -> np.ndarray | None:
        return None


def stub_tokenizer(texts: list[str], **options: Any) -> dict[str, np.ndarray]:
    """Each text's length, padded with zeros to the ``max_length`` asked for: the call a tokenizer gets."""
    ids = np.zeros((len(texts), options["max_length"]), np.int64)
    ids[:, 0] = [len(text) for text in texts]
    return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}


class StubEmbedder:
    """What the pipeline needs of :class:`worker.inference.embedder.Embedder`, and nothing more."""

    label = "stub"
    dim = DIM
    device = torch.device("cpu")
    runs_asynchronously = False
    preprocessing = Preprocessing(size=8, crop=8)

    def __init__(self, texts: bool = False) -> None:
        self.images = 0
        self.batches: list[tuple[str, int]] = []  # (modality, size) of every launch, in order
        self.text: TextTower | None = None  # no text tower: a worker with this embedder embeds no texts
        self.dies: BaseException | None = None  # set: every launch raises it (the inference thread dies)
        if texts:
            self.text = TextTower(None, stub_tokenizer, STUB_TEXT_LENGTH, lambda *_: torch.zeros(0))

    def launch(self, pixels: np.ndarray | Sequence[np.ndarray], heads: object = None) -> StubPending:
        if self.dies is not None:
            raise self.dies
        self.images += len(pixels)
        self.batches.append(("image", len(pixels)))
        return StubPending(len(pixels))

    def launch_decoded(self, pixels: Sequence[np.ndarray], heads: object = None) -> StubPending:
        return self.launch(pixels)

    def launch_texts(self, texts: Sequence[TokenizedText]) -> StubPending:
        assert all(text.ids.shape == (STUB_TEXT_LENGTH,) for text in texts), "texts come tokenised"
        if self.dies is not None:
            raise self.dies
        self.batches.append(("text", len(texts)))
        return StubPending(len(texts), TEXT_VALUE)

    def release_cached_memory(self) -> None:
        pass
