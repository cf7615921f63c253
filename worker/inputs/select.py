"""Which input kinds this worker handles, and how: the one place that maps settings to handlers."""

from __future__ import annotations

from worker.config import Settings
from worker.images import ImageLimits, Preprocessing
from worker.inputs.base import InputHandler
from worker.inputs.image_bytes import ImageDecoder
from worker.messages import InputKind
from worker.metrics import WorkerMetrics

# What a request of a kind this worker does not handle is told (the dead letter's error message).
ENABLE_HINTS: dict[InputKind, str] = {
    InputKind.IMAGE: "this worker takes no inline images",
    InputKind.URI: "this worker does not fetch images by reference",
    InputKind.TEXT: "this worker does not embed texts",
}


def build_handlers(
    settings: Settings,
    limits: ImageLimits,
    preprocessing: Preprocessing,
    decode_workers: int,
    metrics: WorkerMetrics,
) -> dict[InputKind, InputHandler]:
    """The handler of each input kind the settings enable."""
    del settings  # every kind beyond inline images is opt-in through settings
    decoder = ImageDecoder(limits, preprocessing, decode_workers, metrics)
    return {InputKind.IMAGE: decoder}
