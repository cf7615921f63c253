"""Scores from the same pass against a real broker: every output carries the heads' scores, those over the
NSFW threshold are on their own topic, and every id arrives exactly once across output, NSFW topic and DLQ."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

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
from tests.support.schemas import validate_msgpack
from tests.support.score_heads import load_state, reference_aesthetic, reference_nsfw, save_random_heads
from worker.devtools.samples import sample_images
from worker.imaging.host import ImageLimits, decode_and_preprocess
from worker.inference.embedder import Embedder

pytestmark = pytest.mark.integration
TOLERANCE = 1e-5


def _threshold(scores: np.ndarray) -> float:
    """A threshold in the widest gap between the middle scores, so that about half the images are over it
    and no image sits on it."""
    ordered = np.sort(scores)
    middle = range(len(ordered) // 4, 3 * len(ordered) // 4)
    gap = max(middle, key=lambda i: ordered[i + 1] - ordered[i])
    return float((ordered[gap] + ordered[gap + 1]) / 2)


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_scores_and_nsfw_routing_through_a_real_broker(
    kafka_bootstrap: str, tiny_clip_768_embedder: Embedder, tmp_path: Path, exactly_once: bool
):
    embedder = tiny_clip_768_embedder
    # Random heads saved as they are published, loaded by the worker through its own loading code.
    locations = save_random_heads(tmp_path)
    aesthetic_state, nsfw_state = load_state(locations["aesthetic"]), load_state(locations["nsfw"])
    samples = sample_images(30, seed=11)
    decoded = [
        decode_and_preprocess(s.data, ImageLimits(), replace(embedder.preprocessing, resize="torch"))
        for s in samples
    ]
    threshold = _threshold(reference_nsfw(nsfw_state, embedder.embed(np.stack(decoded))))
    settings = worker_settings(
        kafka_bootstrap,
        score="aesthetic,nsfw",
        aesthetic_head=str(locations["aesthetic"]),
        nsfw_head=str(locations["nsfw"]),
        route_nsfw_above=threshold,
        exactly_once=exactly_once,
        batch_size=8,
    )
    assert settings.nsfw_output_topic == f"{settings.output_topic}.nsfw"
    create_topics(settings, partitions=2)
    bad = bad_requests()
    produce(settings, [(s.name, s.data) for s in samples] + [(key, value) for key, value, _ in bad])

    with running_worker(settings, embedder) as worker:
        results = collect(
            settings,
            expected=len(samples) + len(bad),
            timeout_s=120,
            settle_s=1.0,
            read_committed=exactly_once,
        )
        wait_until(lambda: worker.metrics.commits._value.get() > 0, 10, "no offsets committed")

    ids = [r["id"] for r in results.outputs] + [r["id"] for r in results.routed] + results.dlq_keys()
    expected_ids = [s.name for s in samples] + [key for key, _, _ in bad]
    assert Counter(ids) == Counter(expected_ids), "every id exactly once across output, NSFW topic and DLQ"
    assert results.reasons() == {key: reason.value for key, _, reason in bad}

    for raw in results.raw_outputs + results.raw_routed:
        validate_msgpack(raw, "image-embedding.schema.json")
    for records, routed in ((results.outputs, False), (results.routed, True)):
        if not records:
            continue
        vectors = np.stack([r["embedding"] for r in records])
        scores = {name: np.array([r["scores"][name] for r in records]) for name in ("aesthetic", "nsfw")}
        assert all(set(r["scores"]) == {"aesthetic", "nsfw"} for r in records)
        # The scores are the reference heads applied to the very embeddings published.
        assert np.abs(scores["aesthetic"] - reference_aesthetic(aesthetic_state, vectors)).max() < TOLERANCE
        assert np.abs(scores["nsfw"] - reference_nsfw(nsfw_state, vectors)).max() < TOLERANCE
        assert (
            bool(np.all(scores["nsfw"] > threshold)) if routed else bool(np.all(scores["nsfw"] <= threshold))
        )
        assert all(r["model"] == embedder.label and r["dim"] == 768 for r in records)
    assert results.routed and results.outputs, "the threshold splits the images between the two topics"
    assert worker.metrics.nsfw_routed._value.get() == len(results.routed)
    assert worker.metrics.published._value.get() == len(results.routed) + len(results.outputs)
    assert sum(v or 0 for v in committed_offsets(settings, 2).values()) == len(samples) + len(bad)
