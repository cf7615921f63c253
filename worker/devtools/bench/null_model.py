"""An embedder that costs nothing: fixed unit vectors, no model, no device work.

With it the worker runs end to end through Kafka while the forward pass takes no time, so what remains of
each image's cost is the host's: clients, envelopes, batching, publishing, bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch

from worker.imaging.host import Preprocessing
from worker.inference.embedder import Embedder, PendingEmbeddings
from worker.models.clip import ClipFamily
from worker.models.heads import ScoreHeads

NULL_LABEL = "null:host-cost"
VIT_L14_DIM = 768


class _NoWeights(torch.nn.Module):
    """Stands where the model would: a config with the projection size and no parameters."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(projection_dim=dim)


class NullEmbedder(Embedder):
    """Returns the same unit vector for every image, as many as it is given; every output says
    ``model=null:host-cost``."""

    def __init__(self, dim: int = VIT_L14_DIM, max_batch: int = 4096) -> None:
        super().__init__(
            _NoWeights(dim),
            NULL_LABEL,
            "none",
            Preprocessing(),
            torch.device("cpu"),
            torch.float32,
            ClipFamily(),  # stands in for ViT-L/14: a config with its projection size
        )
        vectors = np.zeros((max_batch, dim), dtype=np.float32)
        vectors[:, 0] = 1.0
        self._vectors = torch.from_numpy(vectors)

    def launch(
        self, pixels: np.ndarray | Sequence[np.ndarray], heads: ScoreHeads | None = None
    ) -> PendingEmbeddings:
        """The vectors at once, whatever the pixels (scored by ``heads``, if any)."""
        return self._pending(len(pixels), heads)

    def launch_decoded(
        self, images: Sequence[np.ndarray | torch.Tensor], heads: ScoreHeads | None = None
    ) -> PendingEmbeddings:
        """The vectors at once: no resize, no forward pass."""
        return self._pending(len(images), heads)

    def _pending(self, count: int, heads: ScoreHeads | None) -> PendingEmbeddings:
        vectors = self._vectors[:count]
        if heads is None:
            return PendingEmbeddings(vectors, None)
        with torch.inference_mode():
            return PendingEmbeddings(vectors, None, heads(vectors))
