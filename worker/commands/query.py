"""``clip-worker query``: one text's embedding, printed, for ad-hoc checks without Kafka."""

from __future__ import annotations

from typing import Any

import numpy as np

from worker.config import Settings
from worker.inference.embedder import load_embedder
from worker.loop.service import model_spec

HEAD_VALUES = 8


def query_text(settings: Settings, text: str, full: bool = False) -> dict[str, Any]:
    """Load the settings' model with its text tower and embed ``text`` as the worker would: the model, dim,
    norm and first values of the vector (and the whole vector with ``full``)."""
    embedder = load_embedder(model_spec(settings), texts=True)
    vector = embedder.embed_texts([text])[0]
    shown: dict[str, Any] = {
        "model": embedder.label,
        "family": embedder.family.name,
        "text": text,
        "dim": int(vector.shape[0]),
        "norm": round(float(np.linalg.norm(vector)), 6),
        "first": [round(float(value), 6) for value in vector[:HEAD_VALUES]],
    }
    if full:
        shown["embedding"] = [float(value) for value in vector]
    return shown
