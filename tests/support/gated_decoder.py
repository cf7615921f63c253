"""The real image decoder, holding every decode until the test opens its gate."""

from __future__ import annotations

import threading

from worker.imaging.host import ImageLimits, Preprocessing
from worker.intake.inputs.base import Outcome
from worker.intake.inputs.image_bytes import ImageDecoder
from worker.ops.metrics import WorkerMetrics


class GatedDecoder(ImageDecoder):
    """An :class:`ImageDecoder` whose decode threads wait for :attr:`gate` before each task."""

    def __init__(self, workers: int = 2) -> None:
        super().__init__(ImageLimits(), Preprocessing(), workers, WorkerMetrics())
        self.gate = threading.Event()

    def decode_now(self, images: list[bytes]) -> list[Outcome]:
        """Decode once the gate is open (10 s at most, so a failing test cannot hang)."""
        self.gate.wait(10)
        return super().decode_now(images)
