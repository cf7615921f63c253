"""The intake stage, between poll and batch: request records in, model-ready work or typed rejections out.

The envelope is decoded on the caller's thread (cheap); each request then goes to the handler of its input
kind (:mod:`worker.intake.inputs`), which prepares it off this thread. Results come out in the order the
records went in. The queue holds at most what the poll loop let in, which ``--max-in-flight`` bounds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import wait
from dataclasses import dataclass
from typing import ClassVar

from worker.errors import RejectedRecord, RejectReason
from worker.intake.inputs.base import Fetched, InputHandler, Outcome, Pixels, Slot
from worker.intake.inputs.select import ENABLE_HINTS
from worker.messages import InputKind, Modality, Request, decode_request
from worker.models.text import TokenizedText
from worker.work import InputRecord


@dataclass
class ReadyImage:
    """A decoded (or, with ``--decode device``, checked and still encoded) image waiting for a batch."""

    record: InputRecord
    request: Request
    pixels: Pixels
    fetched: bytes | None = None  # the image as fetched by reference, kept only for --forward-image
    modality: ClassVar[Modality] = Modality.IMAGE


@dataclass
class ReadyText:
    """A tokenised text waiting for a batch of texts."""

    record: InputRecord
    request: Request
    tokens: TokenizedText
    modality: ClassVar[Modality] = Modality.TEXT


# Work ready for a batch of its modality (batches never mix them).
Ready = ReadyImage | ReadyText


def ready_or_rejected(record: InputRecord, request: Request, outcome: Outcome) -> Ready | RejectedRecord:
    """What a handler made of a request: work ready for its batch, or why it cannot be embedded. A handler
    that raised something other than a :class:`RejectedRecord` crashed on the input: a corrupt image."""
    if isinstance(outcome, RejectedRecord):
        return outcome
    if isinstance(outcome, Exception):
        message = f"decoder crashed: {type(outcome).__name__}: {outcome}"
        return RejectedRecord(RejectReason.CORRUPT_IMAGE, message)
    if isinstance(outcome, Fetched):
        return ReadyImage(record, request, outcome.prepared, outcome.image)
    if isinstance(outcome, TokenizedText):
        return ReadyText(record, request, outcome)
    return ReadyImage(record, request, outcome)


@dataclass
class Rejected:
    """A record that cannot be embedded, and why."""

    record: InputRecord
    rejection: RejectedRecord


@dataclass
class _Preparing:
    record: InputRecord
    request: Request
    slot: Slot


class IntakeStage:
    """Decodes requests and hands each to its kind's handler; yields each record's result in order."""

    def __init__(self, handlers: Mapping[InputKind, InputHandler]) -> None:
        self._handlers = dict(handlers)
        self._preparing: deque[_Preparing] = deque()
        self._rejected: deque[Rejected] = deque()

    def submit(self, records: list[InputRecord]) -> None:
        """Decode the records' envelopes now and hand each request to its kind's handler."""
        accepted: list[tuple[InputRecord, Request]] = []
        for record in records:
            try:
                request = decode_request(record.value)
            except RejectedRecord as rejection:
                self._rejected.append(Rejected(record, rejection))
                continue
            if request.kind in self._handlers:
                accepted.append((record, request))
                continue
            message = f"a request by '{request.kind.value}': {ENABLE_HINTS[request.kind]}"
            self._rejected.append(Rejected(record, RejectedRecord(RejectReason.INPUT_KIND_DISABLED, message)))
        # One submission per kind (handlers work in chunks), queued back in the records' order.
        slots: dict[int, Slot] = {}
        for kind, handler in self._handlers.items():
            positions = [i for i, (_record, request) in enumerate(accepted) if request.kind is kind]
            if positions:
                submitted = handler.submit([accepted[i][1] for i in positions])
                slots.update(zip(positions, submitted, strict=True))
        for position, (record, request) in enumerate(accepted):
            self._preparing.append(_Preparing(record, request, slots[position]))

    def reject(self, record: InputRecord, rejection: RejectedRecord) -> None:
        """Pass on a record refused before intake (one the Kafka client could not read, say)."""
        self._rejected.append(Rejected(record, rejection))

    @property
    def busy(self) -> bool:
        """Requests are being prepared."""
        return bool(self._preparing)

    def wait_for_oldest(self, timeout_s: float) -> None:
        """Sleep (without the GIL) until the oldest request is prepared, at most ``timeout_s``."""
        if self._preparing:
            wait([self._preparing[0].slot.future], timeout=timeout_s)

    def collect(self, wait: bool) -> Iterator[Ready | Rejected]:
        """The results ready now, in order (``wait``: every result, waiting for the handlers)."""
        while self._rejected:
            yield self._rejected.popleft()
        while self._preparing and (wait or self._preparing[0].slot.future.done()):
            item = self._preparing.popleft()
            try:
                prepared = item.slot.future.result()[item.slot.index]
            except Exception as exc:  # the whole chunk failed (pool shut down): never lose the record
                prepared = exc
            result = ready_or_rejected(item.record, item.request, prepared)
            yield Rejected(item.record, result) if isinstance(result, RejectedRecord) else result

    def abandon(self) -> list[InputRecord]:
        """Give up the requests still being prepared (a fetch stuck at shutdown): their records, in order.
        Their results, should they come, are never collected."""
        abandoned = [item.record for item in self._preparing]
        self._preparing.clear()
        return abandoned

    def clear(self) -> None:
        """Forget everything queued (exactly-once abort: it will be read again)."""
        self._preparing.clear()
        self._rejected.clear()

    def shutdown(self) -> None:
        """Stop every handler's threads without waiting for queued work."""
        for handler in self._handlers.values():
            handler.shutdown()
