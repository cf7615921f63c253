"""The producer's partitioner puts every record where kafka-python's (and Java's) default one does."""

from __future__ import annotations

import random

import pytest
from kafka.partitioner.default import DefaultPartitioner
from kafka.partitioner.default import murmur2 as reference_murmur2

from worker.config import load_settings
from worker.kafka_io import producer_options, transactional_producer_options
from worker.kafka_io.partitioner import KeyHashPartitioner, murmur2


class Cluster:
    """The three calls a partitioner makes on kafka-python's ClusterMetadata."""

    def __init__(self, partitions: set[int], available: set[int] | None = None) -> None:
        self._partitions = partitions
        self._available = partitions if available is None else available

    def topics(self) -> set[str]:
        return {"out"}

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(self._partitions) if topic == "out" else None

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return set(self._available)


def random_keys(count: int, seed: int = 15) -> list[bytes]:
    rng = random.Random(seed)
    keys = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300))) for _ in range(count)]
    keys += [bytes(rng.getrandbits(8) for _ in range(length)) for length in range(0, 64) for _ in range(8)]
    keys += [f"img-{i}".encode() for i in range(500)] + [b"\xff" * n for n in range(12)]
    return keys


def test_murmur2_equals_kafka_pythons_on_every_key():
    for key in random_keys(3000):
        assert murmur2(key) == reference_murmur2(key), key


@pytest.mark.parametrize(
    ("key", "partition"),
    [(b"", 681), (b"a", 524), (b"ab", 434), (b"abc", 107), (b"123456789", 566), (b"\x00 ", 742)],
)
def test_keys_land_where_the_java_client_puts_them_among_1000_partitions(key: bytes, partition: int):
    # The figures of org.apache.kafka.clients.producer.internals.DefaultPartitioner for 1000 partitions.
    assert KeyHashPartitioner().partition("out", key, key, None, None, Cluster(set(range(1000)))) == partition


@pytest.mark.parametrize(
    "partitions",
    [{0}, set(range(2)), set(range(7)), set(range(64)), {0, 1, 3}, {2, 5, 9, 11}, {4}],
    ids=str,
)
def test_keyed_records_get_the_default_partitioners_choice(partitions: set[int]):
    # Availability does not matter for keyed records: a key keeps its partition while its leader is away.
    cluster = Cluster(partitions, available={min(partitions)})
    fast, default = KeyHashPartitioner(), DefaultPartitioner()
    for key in random_keys(400):
        assert fast.partition("out", key, key, b"v", b"v", cluster) == default.partition(
            "out", key, key, b"v", b"v", cluster
        ), key


@pytest.mark.parametrize("available", [{1, 3}, set()], ids=["some available", "none available"])
def test_records_without_a_key_keep_the_default_behaviour(available: set[int]):
    cluster = Cluster({0, 1, 2, 3}, available)
    fast, default = KeyHashPartitioner(), DefaultPartitioner()
    random.seed(42)
    chosen = [fast.partition("out", None, None, b"v", b"v", cluster) for _ in range(200)]
    random.seed(42)
    expected = [default.partition("out", None, None, b"v", b"v", cluster) for _ in range(200)]
    assert chosen == expected
    assert set(chosen) == (available or {0, 1, 2, 3})


def test_an_unknown_topic_is_refused_as_the_default_refuses_it():
    with pytest.raises(ValueError, match="not found"):
        KeyHashPartitioner().partition("other", b"k", b"k", None, None, Cluster({0, 1}))


def test_both_producers_use_it():
    settings = load_settings({"device": "cpu"}, environ={})
    assert isinstance(producer_options(settings)["partitioner"], KeyHashPartitioner)
    transactional = transactional_producer_options(settings, "t")
    assert isinstance(transactional["partitioner"], KeyHashPartitioner)
