"""End to end against a real broker: images in, embeddings and dead letters out, nothing lost."""

import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from tests.support.bad_inputs import bad_requests
from tests.support.kafka_helpers import (
    collect,
    committed_offsets,
    create_topics,
    produce,
    running_worker,
    wait_until,
    worker_settings,
)
from tests.support.schemas import validate_dlq_headers, validate_msgpack
from tests.support.tiny_clip import TINY_DIM
from worker.devtools.samples import Sample, jpeg_corpus, sample_images
from worker.imaging.host import ImageLimits, decode_and_preprocess

pytestmark = pytest.mark.integration


# The default broker (a container in CI) and, always, the Apache Kafka jars on loopback: both paths that
# kafka_bootstrap can take stay covered by a full round trip; and each Kafka client the worker can use.
@pytest.mark.parametrize(
    ("broker", "kafka_client"),
    [
        ("kafka_bootstrap", "kafka-python"),
        ("jar_kafka_bootstrap", "kafka-python"),
        ("kafka_bootstrap", "librdkafka"),
    ],
    ids=["default-broker", "jar-broker", "librdkafka"],
)
def test_round_trip_of_200_images_with_bad_ones(broker, kafka_client, request, tiny_embedder):
    settings = worker_settings(request.getfixturevalue(broker), batch_size=16, kafka_client=kafka_client)
    create_topics(settings, partitions=3)
    good = [(s.name, s.data) for s in sample_images(200)]
    bad = bad_requests()
    produce(settings, good + [(key, value) for key, value, _ in bad])

    with running_worker(settings, tiny_embedder) as worker:
        results = collect(settings, expected=len(good) + len(bad), timeout_s=120, settle_s=1.0)
        wait_until(lambda: worker.metrics.commits._value.get() > 0, 10, "no offsets committed")

    output_ids = [r["id"] for r in results.outputs]
    all_ids = output_ids + results.dlq_keys()
    expected_ids = [name for name, _ in good] + [key for key, _, _ in bad]
    assert Counter(all_ids) == Counter(expected_ids), "every id exactly once across output and DLQ"

    for raw, key, record in zip(results.raw_outputs, results.output_keys, results.outputs, strict=True):
        validate_msgpack(raw, "image-embedding.schema.json")
        assert key == record["id"].encode()
        assert record["dim"] == TINY_DIM
        assert abs(float(np.linalg.norm(record["embedding"])) - 1.0) < 1e-5
        assert record["model"] == tiny_embedder.label
        assert record["meta"] == {"n": record["id"]}
        assert record["source"]["topic"] == settings.input_topic

    sent_values = {key: value for key, value, _ in bad}
    for message in results.dead:
        shown = validate_dlq_headers(list(message.headers))
        assert message.value == sent_values[message.key.decode()], "DLQ keeps the original bytes"
        assert shown["clip-worker-source-topic"] == settings.input_topic
    assert results.reasons() == {key: reason.value for key, _, reason in bad}

    dlq_counts = {
        labels["reason"]: value
        for labels, value in (
            (sample.labels, sample.value)
            for metric in worker.metrics.dlq.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        )
    }
    assert dlq_counts == dict(Counter(reason.value for _, _, reason in bad))
    committed = committed_offsets(settings, 3)
    assert sum(v or 0 for v in committed.values()) == len(good) + len(bad)


def test_partial_batch_is_flushed_by_the_timeout(kafka_bootstrap, tiny_embedder):
    settings = worker_settings(kafka_bootstrap, batch_size=64, batch_timeout_ms=300)
    create_topics(settings)
    with running_worker(settings, tiny_embedder) as worker:
        wait_until(lambda: worker.metrics.assigned_partitions._value.get() > 0, 30, "worker never joined")
        sent_at = time.monotonic()
        produce(settings, [(s.name, s.data) for s in sample_images(5)])
        results = collect(settings, expected=5, timeout_s=30)
        waited = time.monotonic() - sent_at
        assert len(results.outputs) == 5, "a partial batch must not wait for more images"
        closes = {
            s.labels["cause"]: s.value
            for m in worker.metrics.batch_closes.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
        assert closes.get("timeout", 0) >= 1 and closes.get("size", 0) == 0
        assert waited < 15


def test_key_defaults_to_id_and_forward_image(kafka_bootstrap, tiny_embedder):
    settings = worker_settings(kafka_bootstrap, forward_image=True)
    create_topics(settings)
    samples = sample_images(3)
    produce(settings, [(s.name, s.data) for s in samples], keyed=False)
    with running_worker(settings, tiny_embedder):
        results = collect(settings, expected=3, timeout_s=60)
    by_id = {s.name: s.data for s in samples}
    assert sorted(k or b"" for k in results.output_keys) == sorted(name.encode() for name in by_id)
    for record in results.outputs:
        assert record["image"] == by_id[record["id"]]


@pytest.mark.parametrize(
    ("resize", "decode"),
    [("device", "pil"), ("device", "device"), ("pil", "pil")],
    ids=["device", "device-decode", "pil"],
)
def test_every_preprocessing_path_publishes_the_embeddings_it_computes(
    kafka_bootstrap, tiny_embedder, resize, decode
):
    settings = worker_settings(kafka_bootstrap, resize=resize, decode=decode, batch_size=4)
    create_topics(settings)
    samples = sample_images(10, seed=3) + [
        Sample(f"large-{i}.jpg", data, "900x600 JPEG") for i, data in enumerate(jpeg_corpus(3, 900, 600))
    ]
    bad = [(key, value) for key, value, _reason in bad_requests()]
    produce(settings, [(s.name, s.data) for s in samples] + bad)
    with running_worker(settings, tiny_embedder) as worker:
        results = collect(settings, expected=len(samples) + len(bad), timeout_s=60)
    device_batches = worker.metrics.registry.get_sample_value(
        "clip_worker_stage_seconds_count", {"stage": "device_decode"}
    )
    assert (device_batches or 0) > 0 if decode == "device" else device_batches is None
    # The same images embedded outside the worker, decoded on the host.
    params = replace(tiny_embedder.preprocessing, resize=resize)
    decoded = [decode_and_preprocess(s.data, ImageLimits(), params) for s in samples]
    if resize == "device":
        expected = tiny_embedder.embed_decoded(decoded)
    else:
        expected = tiny_embedder.embed(np.stack(decoded))
    by_id = {record["id"]: record["embedding"] for record in results.outputs}
    assert len(by_id) == len(samples)
    for sample, vector in zip(samples, expected, strict=True):
        np.testing.assert_allclose(by_id[sample.name], vector, atol=1e-5)
    expected_reasons = {key: reason.value for key, _value, reason in bad_requests()}
    assert results.reasons() == expected_reasons
