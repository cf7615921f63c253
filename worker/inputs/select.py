"""Which input kinds this worker handles, and how: the one place that maps settings to handlers."""

from __future__ import annotations

from worker.config import Settings
from worker.errors import StartupError
from worker.images import ImageLimits, Preprocessing
from worker.inputs.base import InputHandler
from worker.inputs.image_bytes import ImageDecoder
from worker.inputs.text import TextTokenizer
from worker.messages import InputKind
from worker.metrics import WorkerMetrics
from worker.models.text import TextTower

# What a request of a kind this worker does not handle is told (the dead letter's error message).
ENABLE_HINTS: dict[InputKind, str] = {
    InputKind.IMAGE: "this worker takes no inline images",
    InputKind.URI: "this worker does not fetch images by reference",
    InputKind.TEXT: "this worker does not embed texts; start it with --texts (CLIP_WORKER_TEXTS=true)",
}


def build_handlers(
    settings: Settings,
    limits: ImageLimits,
    preprocessing: Preprocessing,
    decode_workers: int,
    metrics: WorkerMetrics,
    text: TextTower | None = None,
) -> dict[InputKind, InputHandler]:
    """The handler of each input kind the settings enable (texts: ``text``, the loaded text tower)."""
    decoder = ImageDecoder(limits, preprocessing, decode_workers, metrics)
    handlers: dict[InputKind, InputHandler] = {InputKind.IMAGE: decoder}
    if settings.texts:
        if text is None:
            raise StartupError("--texts needs the model's text tower, which was not loaded")
        handlers[InputKind.TEXT] = TextTokenizer(text, metrics)
    return handlers
