"""The one fake of the publisher for unit tests of the inference stage: records what it is handed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.errors import RejectedRecord
from worker.messages import Request
from worker.work import InputRecord


@dataclass(frozen=True)
class Published:
    """One embedding handed to the publisher."""

    id: str
    vector: np.ndarray
    scores: object
    fetched: bytes | None


class RecordingPublisher:
    """Stands in for :class:`worker.output.publisher.Publisher` on the calls the inference stage makes."""

    def __init__(self) -> None:
        self.published: list[Published] = []
        self.dead: list[tuple[str, RejectedRecord]] = []  # (record key, why)

    def embedding(
        self,
        record: InputRecord,
        request: Request,
        vector: np.ndarray,
        scores: object = None,
        fetched: bytes | None = None,
    ) -> None:
        """Record an embedding."""
        self.published.append(Published(request.id, vector, scores, fetched))

    def reject(self, record: InputRecord, rejection: RejectedRecord) -> None:
        """Record a dead letter."""
        self.dead.append((record.key.decode() if record.key else "", rejection))

    @property
    def ids(self) -> list[str]:
        """The published ids, in order."""
        return [published.id for published in self.published]
