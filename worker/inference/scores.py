"""Scores from the same pass: which heads ``--score`` asks for, loaded for the model, and where a scored
output goes (``--route-nsfw-above``)."""

from __future__ import annotations

import logging

from worker.config import NSFW_WEIGHTS_URL, Settings, flag_name
from worker.errors import ModelLoadError
from worker.inference.embedder import Embedder
from worker.models.checkpoint import ModelSpec
from worker.models.heads import LoadedHead, ScoreHeads, check_trained_on, load_head

log = logging.getLogger(__name__)


def head_location(settings: Settings, name: str) -> str | None:
    """The setting that says where head ``name``'s weights are (``--<name>-head``)."""
    location: str | None = getattr(settings, f"{name}_head")
    return location


def load_score_heads(settings: Settings, embedder: Embedder) -> ScoreHeads | None:
    """The heads ``--score`` names, on the embedder's device; None without ``--score``.

    Raises :class:`ModelLoadError` (one line naming the fix) for a model whose embedding a head was not
    trained on, before any weights are read, and for weights that cannot be loaded.
    """
    if not settings.score:
        return None
    for name in settings.score:
        check_trained_on(name, embedder.family.name, embedder.dim)
    loaded: dict[str, LoadedHead] = {}
    for name in settings.score:
        flag = flag_name(f"{name}_head")
        location = head_location(settings, name)
        if location is None and not settings.random_weights:
            raise ModelLoadError(
                f"--score {name} needs {flag}: download LAION's {NSFW_WEIGHTS_URL} and pass the zip, the "
                f".pth inside it, or their directory (or pass --random-weights for an offline smoke run)"
            )
        spec = ModelSpec(
            model=location or name,
            model_dir=settings.model_dir,
            local_files_only=settings.local_files_only,
            random_weights=settings.random_weights,
        )
        loaded[name] = load_head(name, spec, flag)
        trained = loaded[name].head.trained_on
        if embedder.label != trained.model:
            log.info(
                "the %s head was trained on %s embeddings; the model is %s (same family and size)",
                name,
                trained.model,
                embedder.label,
            )
    heads = ScoreHeads(loaded, embedder.device)
    log.info("scores %s from %s", ", ".join(heads.names), ", ".join(heads.labels.values()))
    return heads
