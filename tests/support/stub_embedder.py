"""An embedder that costs nothing: every image gets the same unit vector. For unit tests of the loop."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from worker.images import Preprocessing

DIM = 4


class StubPending:
    """Vectors already computed."""

    def __init__(self, count: int) -> None:
        self._count = count

    def result(self) -> np.ndarray:
        return np.full((self._count, DIM), 0.5, np.float32)

    def scores(self) -> np.ndarray | None:
        return None


class StubEmbedder:
    """What the pipeline needs of :class:`worker.embedder.Embedder`, and nothing more."""

    label = "stub"
    dim = DIM
    device = torch.device("cpu")
    runs_asynchronously = False
    preprocessing = Preprocessing(size=8, crop=8)

    def __init__(self) -> None:
        self.images = 0

    def launch(self, pixels: np.ndarray | Sequence[np.ndarray], heads: object = None) -> StubPending:
        self.images += len(pixels)
        return StubPending(len(pixels))

    def launch_decoded(self, pixels: Sequence[np.ndarray], heads: object = None) -> StubPending:
        return self.launch(pixels)

    def release_cached_memory(self) -> None:
        pass
