"""A family's text tower and its tokenizer: texts in, token ids out, text features from the ids.

Every text is padded (and truncated) to the tower's fixed length, as its family's reference does: the
ids of one text never depend on the others of its batch, so texts are tokenised one chunk at a time and
stacked into any batch later. Where the family's tower cannot see the padding (CLIP), a stacked batch is cut
to its longest text: a short query then costs its own tokens, not the whole context's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class TokenizedText:
    """One text as its tower takes it: ``ids`` (int64, the tower's length) and, where the tokenizer makes
    one, the attention ``mask`` of the same length."""

    ids: np.ndarray
    mask: np.ndarray | None


@dataclass(frozen=True)
class TextTower:
    """A loaded text tower (on the CPU in float32 until the embedder moves it), its tokenizer, and the
    length every text is padded to. ``read_features`` is the family's: model, ids, mask -> features."""

    model: Any
    tokenizer: Any
    length: int
    read_features: Callable[[Any, torch.Tensor, torch.Tensor | None], torch.Tensor]
    trim_padding: bool = False

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        """Token ids of ``texts``, each padded and truncated to :attr:`length` (one tokenizer call)."""
        encoded = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.length,
            truncation=True,
            return_tensors="np",
        )
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        mask = encoded.get("attention_mask")
        masks = None if mask is None else np.asarray(mask, dtype=np.int64)
        return [TokenizedText(ids[row], None if masks is None else masks[row]) for row in range(len(texts))]

    def features(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The ``(N, dim)`` text features (not normalised) of a batch of ids on the tower's device."""
        return self.read_features(self.model, ids, mask)


def stack(texts: Sequence[TokenizedText], trim: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch of tokenised texts as ``(N, length)`` id and mask tensors (no mask if they have none);
    with ``trim`` and a mask, ``length`` is the batch's longest text instead of the tower's."""
    ids = np.stack([text.ids for text in texts])
    if texts[0].mask is None:
        return torch.from_numpy(ids), None
    mask = np.stack([text.mask for text in texts if text.mask is not None])
    if trim:  # up to the last position any text attends to (all of them, should a tokenizer pad on the left)
        used = int(np.flatnonzero(mask.any(axis=0))[-1]) + 1 if mask.any() else 1
        ids, mask = np.ascontiguousarray(ids[:, :used]), np.ascontiguousarray(mask[:, :used])
    return torch.from_numpy(ids), torch.from_numpy(mask)
