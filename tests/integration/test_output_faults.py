"""Output-side faults: a missing output topic stops start-up with a clear line; records the broker refuses
as too large are dead-lettered, never dropped and never stall the partition."""

import io
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.support.kafka_helpers import (
    CLI,
    clean_env,
    collect,
    committed_offsets,
    produce,
    running_worker,
    topic_flags,
    worker_settings,
)
from worker.devtools.samples import jpeg_corpus
from worker.kafka_io import ensure_topics
from worker.messages import VALUE_OMITTED_HEADER

pytestmark = pytest.mark.integration


def test_missing_output_topic_stops_startup_naming_the_flag(kafka_bootstrap, tiny_clip_dir):
    settings = worker_settings(kafka_bootstrap)
    ensure_topics(settings, {settings.input_topic: 1, settings.dlq_topic: 1})
    result = subprocess.run(
        [*CLI, "run", "--model", str(tiny_clip_dir), "--metrics-port", "0", *topic_flags(settings)],
        capture_output=True, text=True, timeout=120, env=clean_env(), check=False,
    )  # fmt: skip
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert settings.output_topic in last and "--output-topic" in last


def noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(3).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_outputs_the_broker_refuses_as_too_large_are_dead_lettered(
    kafka_bootstrap, tiny_embedder, exactly_once
):
    # The worker reads both topics' max.message.bytes at start-up and checks records before sending, so
    # the broker never has to refuse one: no transaction is aborted in exactly-once mode either.
    settings = worker_settings(kafka_bootstrap, forward_image=True, exactly_once=exactly_once)
    ensure_topics(settings, {settings.input_topic: 1})
    # The output and DLQ topics accept 100 kB; the 190 kB image fits the input topic only.
    ensure_topics(settings, {settings.output_topic: 1, settings.dlq_topic: 1}, max_message_bytes=100_000)
    big = noise_png(250)
    assert len(big) > 150_000
    small = [(f"small-{i}.jpg", data) for i, data in enumerate(jpeg_corpus(4, 96, 64))]
    produce(settings, [*small[:2], ("big.png", big), *small[2:]])
    with running_worker(settings, tiny_embedder) as worker:
        results = collect(settings, expected=5, timeout_s=60, read_committed=exactly_once, settle_s=1.0)
    assert sorted(r["id"] for r in results.outputs) == sorted(name for name, _ in small)
    assert results.reasons() == {"big.png": "output_too_large"}
    [dead] = results.dead
    headers = dict(dead.headers)
    assert int(headers[VALUE_OMITTED_HEADER]) > 150_000, "the DLQ refused the value too: its size is recorded"
    assert committed_offsets(settings, 1) == {0: 5}
    aborted = {
        sample.labels["reason"]: sample.value
        for metric in worker.metrics.transactions_aborted.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }
    assert aborted == {}
