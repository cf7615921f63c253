"""Requests by ``uri`` through the intake stage: fetched from a real loopback origin on a bounded pool,
decoded like inline images, in record order, with fetch and decode failures typed."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest

from tests.support.gated_decoder import GatedDecoder
from worker.config import load_settings
from worker.devtools.origin import ImageOrigin
from worker.devtools.samples import jpeg_corpus
from worker.errors import RejectReason
from worker.fetching.fetcher import Fetcher, FetchPolicy
from worker.fetching.retry import RetryPolicy
from worker.imaging.host import ImageLimits, Preprocessing
from worker.intake.inputs.image_bytes import ImageDecoder
from worker.intake.inputs.image_uri import ImageFetcher
from worker.intake.inputs.select import build_handlers, fetch_policy
from worker.intake.stage import IntakeStage, ReadyImage, Rejected
from worker.messages import InputKind, Source
from worker.ops.metrics import WorkerMetrics
from worker.work import InputRecord

JPEGS = jpeg_corpus(4, width=320, height=240)


@pytest.fixture
def origin() -> Iterator[ImageOrigin]:
    with ImageOrigin() as server:
        for index, data in enumerate(JPEGS):
            server.put(f"{index}.jpg", data)
        server.put("text.txt", b"not an image at all")
        yield server


def record(offset: int, **fields: object) -> InputRecord:
    value = msgpack.packb({"id": f"r{offset}", **fields}, use_bin_type=True)
    return InputRecord(Source("in", 0, offset), None, value, [], 0, 0.0)


def intake(concurrency: int = 8, forward: bool = False, decoder: ImageDecoder | None = None) -> IntakeStage:
    metrics = WorkerMetrics()
    decoder = decoder or ImageDecoder(ImageLimits(), Preprocessing(), 2, metrics)
    policy = FetchPolicy(
        schemes=frozenset({"http"}),
        allow_hosts=("127.0.0.1",),
        timeout_s=2.0,
        retries=1,
        backoff=RetryPolicy(base_delay_s=0.01, max_delay_s=0.02),
    )
    fetcher = ImageFetcher(Fetcher(policy, metrics), decoder, concurrency, forward)
    return IntakeStage({InputKind.IMAGE: decoder, InputKind.URI: fetcher})


def test_references_and_inline_images_come_out_in_order_with_the_same_pixels(origin):
    stage = intake()
    records = []
    for index, data in enumerate(JPEGS):
        records.append(record(2 * index, image=data))
        records.append(record(2 * index + 1, uri=origin.url(f"/o/{index}.jpg")))
    stage.submit(records)
    results = list(stage.collect(wait=True))
    stage.shutdown()
    assert [r.record.source.offset for r in results] == list(range(len(records)))
    assert all(isinstance(r, ReadyImage) for r in results)
    for inline, fetched in zip(results[0::2], results[1::2], strict=True):
        assert isinstance(inline, ReadyImage) and isinstance(fetched, ReadyImage)
        assert np.array_equal(np.asarray(inline.pixels), np.asarray(fetched.pixels))
        assert fetched.fetched is None, "the fetched bytes are dropped unless forwarded"


def test_fetch_and_decode_failures_are_typed_and_keep_their_place(origin):
    stage = intake()
    stage.submit(
        [
            record(0, uri=origin.url("/o/missing.jpg")),
            record(1, uri=origin.url("/o/0.jpg")),
            record(2, uri=origin.url("/o/text.txt")),
            record(3, uri=f"http://[::1]:{origin.port}/o/0.jpg"),
            record(4, uri="ftp://example.com/x.jpg"),
            record(5, uri="http://exa mple.com/x.jpg"),
        ]
    )
    results = list(stage.collect(wait=True))
    stage.shutdown()
    reasons = [r.rejection.reason if isinstance(r, Rejected) else "ok" for r in results]
    assert reasons == [
        RejectReason.FETCH_NOT_FOUND,
        "ok",
        RejectReason.NOT_AN_IMAGE,
        RejectReason.FETCH_FORBIDDEN,  # loopback, and only 127.0.0.1 is opened
        RejectReason.FETCH_FORBIDDEN,
        RejectReason.INVALID_ENVELOPE,
    ]


def test_forwarding_keeps_the_fetched_bytes(origin):
    stage = intake(forward=True)
    stage.submit([record(0, uri=origin.url("/o/1.jpg"))])
    [result] = list(stage.collect(wait=True))
    stage.shutdown()
    assert isinstance(result, ReadyImage) and result.fetched == JPEGS[1]


def test_fetches_run_concurrently_up_to_the_pool_size(origin):
    origin.latency_s = 0.3
    stage = intake(concurrency=4)
    started = time.monotonic()
    stage.submit([record(i, uri=origin.url(f"/o/{i % 4}.jpg")) for i in range(12)])
    results = list(stage.collect(wait=True))
    elapsed = time.monotonic() - started
    stage.shutdown()
    assert all(isinstance(r, ReadyImage) for r in results)
    assert origin.peak_serving == 4, "never more fetches at once than --fetch-concurrency"
    assert elapsed < 12 * 0.3, "fetches overlap"


def test_fetched_bodies_are_bounded_while_the_decoders_are_behind(origin):
    # A fetched body keeps its room until its image is decoded, so no more than twice
    # --fetch-concurrency bodies are ever held however far fetching could run ahead.
    decoder = GatedDecoder()
    stage = intake(concurrency=2, decoder=decoder)
    stage.submit([record(i, uri=origin.url(f"/o/{i % 4}.jpg")) for i in range(9)])
    deadline = time.monotonic() + 10
    while sum(origin.requests.values()) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # room for a fifth fetch, were there room for its body
    fetched_while_held = sum(origin.requests.values())
    decoder.gate.set()
    results = list(stage.collect(wait=True))
    stage.shutdown()
    assert fetched_while_held == 4
    assert all(isinstance(r, ReadyImage) for r in results) and len(results) == 9
    assert sum(origin.requests.values()) == 9


def test_the_settings_enable_references_unless_no_scheme_is(tmp_path):
    limits = ImageLimits(max_bytes=12345)
    metrics = WorkerMetrics()
    default = load_settings({}, environ={})
    handlers = build_handlers(default, limits, Preprocessing(), 1, metrics)
    for handler in handlers.values():
        handler.shutdown()
    assert set(handlers) == {InputKind.IMAGE, InputKind.URI}
    policy = fetch_policy(default, limits)
    assert policy.max_bytes == 12345 and policy.schemes == {"http", "https", "s3"}
    off = load_settings({"fetch_schemes": ""}, environ={})
    assert set(build_handlers(off, limits, Preprocessing(), 1, metrics)) == {InputKind.IMAGE}
