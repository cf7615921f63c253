import pytest

from worker.kafka_io import TopicPartition
from worker.output.delivery.ordering import InOrderRelease, OutOfOrderError

TP = TopicPartition("images", 0)
OTHER = TopicPartition("images", 1)


def test_a_result_waits_for_every_earlier_offset_of_its_partition():
    order: InOrderRelease[str] = InOrderRelease()
    for offset in (3, 4, 7):
        assert order.expect(TP, offset)
    assert order.expect(OTHER, 0)
    assert order.ready(TP, 7, "c") == []
    assert order.ready(OTHER, 0, "x") == ["x"]  # partitions do not wait for each other
    assert order.ready(TP, 4, "b") == []
    assert order.ready(TP, 3, "a") == ["a", "b", "c"]
    assert order.released_since_mark() == {TP: 7, OTHER: 0}


def test_mark_restarts_the_count_of_releases_but_keeps_what_is_expected():
    order: InOrderRelease[str] = InOrderRelease()
    order.expect(TP, 0)
    order.expect(TP, 1)
    assert order.ready(TP, 0, "a") == ["a"]
    order.mark()
    assert order.released_since_mark() == {}
    assert order.ready(TP, 1, "b") == ["b"]
    assert order.released_since_mark() == {TP: 1}


def test_a_redelivered_offset_is_refused_until_clear():
    order: InOrderRelease[str] = InOrderRelease()
    assert order.expect(TP, 5)
    assert order.ready(TP, 5, "a") == ["a"]
    assert not order.expect(TP, 5)
    assert not order.expect(TP, 4)
    order.clear()
    assert order.expect(TP, 4)


def test_a_result_nobody_expected_is_an_error():
    order: InOrderRelease[str] = InOrderRelease()
    order.expect(TP, 1)
    with pytest.raises(OutOfOrderError):
        order.ready(TP, 2, "?")
    with pytest.raises(OutOfOrderError):
        order.ready(OTHER, 1, "?")
