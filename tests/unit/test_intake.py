"""The intake stage's dispatch: each request to its kind's handler, results in record order."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import msgpack
import numpy as np

from worker.devtools.samples import jpeg_corpus
from worker.errors import RejectReason
from worker.imaging.host import ImageLimits, Preprocessing
from worker.intake.inputs.base import Outcome, Slot
from worker.intake.inputs.image_bytes import ImageDecoder
from worker.intake.stage import IntakeStage, Ready, ReadyImage, Rejected
from worker.messages import InputKind, Request, Source
from worker.ops.metrics import WorkerMetrics
from worker.work import InputRecord


class ManualHandler:
    """Prepares each request as a 1-element array of its position; the test decides when chunks finish."""

    def __init__(self) -> None:
        self.futures: list[Future[list[Outcome]]] = []
        self.seen: list[Request] = []
        self.stopped = False

    def submit(self, requests: list[Request]) -> list[Slot]:
        future: Future[list[Outcome]] = Future()
        self.futures.append(future)
        self.seen.extend(requests)
        return [Slot(future, index) for index in range(len(requests))]

    def finish(self, chunk: int, results: list[Outcome]) -> None:
        self.futures[chunk].set_result(results)

    def shutdown(self) -> None:
        self.stopped = True


def record(offset: int, **fields: object) -> InputRecord:
    value = msgpack.packb({"id": f"r{offset}", **fields}, use_bin_type=True)
    return InputRecord(Source("in", 0, offset), None, value, [], 0, 0.0)


def ids(results: list[Ready | Rejected]) -> list[str]:
    return [f"r{result.record.source.offset}" for result in results]


def test_each_kind_goes_to_its_handler_and_results_keep_the_records_order():
    images, uris = ManualHandler(), ManualHandler()
    intake = IntakeStage({InputKind.IMAGE: images, InputKind.URI: uris})
    intake.submit(
        [record(0, image=b"a"), record(1, uri="http://h/1"), record(2, image=b"b"), record(3, uri="s3://b/k")]
    )
    assert [r.id for r in images.seen] == ["r0", "r2"]
    assert [r.id for r in uris.seen] == ["r1", "r3"]
    uris.finish(0, [np.zeros(1), np.ones(1)])
    assert list(intake.collect(wait=False)) == []  # r0's image is not ready: nothing may overtake it
    images.finish(0, [np.zeros(1), np.ones(1)])
    results = list(intake.collect(wait=False))
    assert ids(results) == ["r0", "r1", "r2", "r3"]
    assert all(isinstance(result, ReadyImage) for result in results)
    intake.shutdown()
    assert images.stopped and uris.stopped


def test_a_kind_without_a_handler_is_rejected_with_a_reason_naming_it():
    intake = IntakeStage({InputKind.IMAGE: ManualHandler()})
    intake.submit([record(0, text="a photo of a dog"), record(1, uri="http://h/x")])
    results = list(intake.collect(wait=False))
    assert ids(results) == ["r0", "r1"]
    for result, kind in zip(results, ["text", "uri"], strict=True):
        assert isinstance(result, Rejected)
        assert result.rejection.reason is RejectReason.INPUT_KIND_DISABLED
        assert f"'{kind}'" in result.rejection.message


def test_a_handlers_exception_item_is_that_records_rejection_only():
    images = ManualHandler()
    intake = IntakeStage({InputKind.IMAGE: images})
    intake.submit([record(0, image=b"a"), record(1, image=b"b")])
    images.finish(0, [RuntimeError("boom"), np.zeros(1)])
    first, second = intake.collect(wait=False)
    assert isinstance(first, Rejected) and first.rejection.reason is RejectReason.CORRUPT_IMAGE
    assert isinstance(second, ReadyImage)


def test_image_decoding_takes_few_submissions_for_a_large_poll_and_keeps_every_thread_busy_for_a_small_one():
    metrics = WorkerMetrics()
    decoder = ImageDecoder(ImageLimits(), Preprocessing(resize="device"), 2, metrics)
    submitted: list[int] = []
    submit = decoder._pool.submit

    def counting_submit(fn: Any, chunk: list[bytes]) -> Any:
        submitted.append(len(chunk))
        return submit(fn, chunk)

    decoder._pool.submit = counting_submit  # type: ignore[method-assign,assignment]
    images = jpeg_corpus(4, 16, 16)
    try:
        slots = decoder.submit_images(images * 50)  # a poll of 200 images
        assert submitted == [32] * 6 + [8], "chunks of 32: 7 submissions instead of 25"
        shapes = [slot.future.result()[slot.index].shape for slot in slots]  # type: ignore[union-attr]
        assert shapes == [(16, 16, 3)] * 200
        submitted.clear()
        decoder.submit_images(images[:3])
        assert submitted == [1, 1, 1], "a small poll still goes to every thread"
    finally:
        decoder.shutdown()
    sample = metrics.registry.get_sample_value("clip_worker_stage_seconds_count", {"stage": "decode"})
    assert sample is not None and sample >= 200, "one decode observation per image"
