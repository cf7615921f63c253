"""The inference stage's order of work: the next batch is launched before the previous one is awaited."""

import threading
import time

import numpy as np
import torch

from tests.support.recording_publisher import RecordingPublisher
from worker.imaging.host import ImageLimits, Preprocessing
from worker.inference.stage import InferenceStage
from worker.intake.batcher import Batch, CloseCause
from worker.intake.stage import Ready, ReadyImage
from worker.messages import Request, Source
from worker.ops.metrics import WorkerMetrics
from worker.work import InputRecord


class RecordingEmbedder:
    """Records launches and waits; a batch is 'computed' only when its result is awaited."""

    device = torch.device("cpu")

    def __init__(self, fail_batches: frozenset[int] = frozenset(), runs_asynchronously: bool = True) -> None:
        self.runs_asynchronously = runs_asynchronously  # as on a GPU unless told otherwise
        self.events: list[tuple[str, int]] = []
        self.fail_batches = fail_batches
        self.first_result_allowed = threading.Event()  # holds batch 1's result until the test allows it

    def launch(self, pixels: list[np.ndarray], heads: object = None) -> "RecordingPending":
        batch = int(pixels[0][0, 0, 0])
        self.events.append(("launch", batch))
        return RecordingPending(self, batch, len(pixels))

    def release_cached_memory(self) -> None:
        pass


class RecordingPending:
    def __init__(self, owner: RecordingEmbedder, batch: int, count: int) -> None:
        self.owner, self.batch, self.count = owner, batch, count

    def result(self) -> np.ndarray:
        if self.batch == 1:
            assert self.owner.first_result_allowed.wait(5)
        self.owner.events.append(("result", self.batch))
        if self.batch in self.owner.fail_batches and self.count > 1:
            raise RuntimeError("device error")
        return np.full((self.count, 4), self.batch, np.float32)


def batch(number: int, size: int = 2) -> Batch[Ready]:
    items: list[Ready] = []
    for index in range(size):
        name = f"b{number}-{index}"
        record = InputRecord(
            Source("in", 0, number * 10 + index), name.encode(), b"", [], 0, time.monotonic()
        )
        pixels = np.full((3, 4, 4), number, np.float32)
        items.append(ReadyImage(record, Request(name, b""), pixels))
    return Batch(items, CloseCause.SIZE)


def stage_with(embedder: RecordingEmbedder) -> tuple[InferenceStage, RecordingPublisher]:
    publisher = RecordingPublisher()
    stage = InferenceStage(embedder, publisher, WorkerMetrics(), Preprocessing(), ImageLimits())  # type: ignore[arg-type]
    return stage, publisher


def queue_three(stage: InferenceStage, embedder: RecordingEmbedder, size: int = 2) -> None:
    """Batches 1 and 2 wait in the queue when the thread starts; batch 3 is in before batch 1 finishes."""
    assert stage.offer(batch(1, size), wait_s=1) and stage.offer(batch(2, size), wait_s=1)
    stage.start()
    assert stage.offer(batch(3, size), wait_s=5), "the thread took batch 1, making room"
    embedder.first_result_allowed.set()


def test_the_next_batch_is_launched_before_the_previous_one_is_awaited():
    embedder = RecordingEmbedder()
    stage, publisher = stage_with(embedder)
    queue_three(stage, embedder)
    stage.stop(time.monotonic() + 5)
    assert embedder.events == [
        ("launch", 1),
        ("launch", 2),
        ("result", 1),
        ("launch", 3),
        ("result", 2),
        ("result", 3),
    ]
    assert publisher.ids == ["b1-0", "b1-1", "b2-0", "b2-1", "b3-0", "b3-1"]
    assert all(p.vector[0] == int(p.id[1]) for p in publisher.published), "each batch its own vectors"


def test_on_a_cpu_each_batch_is_published_before_the_next_is_launched():
    embedder = RecordingEmbedder(runs_asynchronously=False)
    stage, publisher = stage_with(embedder)
    queue_three(stage, embedder)
    stage.stop(time.monotonic() + 5)
    assert embedder.events == [
        ("launch", 1),
        ("result", 1),
        ("launch", 2),
        ("result", 2),
        ("launch", 3),
        ("result", 3),
    ]
    assert len(publisher.published) == 6


def test_a_lone_batch_is_published_without_waiting_for_another():
    embedder = RecordingEmbedder()
    stage, publisher = stage_with(embedder)
    embedder.first_result_allowed.set()
    stage.start()
    assert stage.offer(batch(1), wait_s=1)
    deadline = time.monotonic() + 5
    while len(publisher.published) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(publisher.published) == 2, "the stage published while its queue stayed empty"
    stage.stop(time.monotonic() + 5)


def test_a_batch_failing_when_awaited_is_split_and_nothing_is_lost():
    embedder = RecordingEmbedder(fail_batches=frozenset({2}))
    stage, publisher = stage_with(embedder)
    queue_three(stage, embedder, size=4)
    stage.stop(time.monotonic() + 5)
    names = sorted(publisher.ids)
    assert names == sorted(f"b{n}-{i}" for n in (1, 2, 3) for i in range(4))
    assert not publisher.dead
