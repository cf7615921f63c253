from kafka.structs import TopicPartition

from worker.output.offsets import OffsetTracker

TP = TopicPartition("images", 0)
OTHER = TopicPartition("images", 1)


def owned_tracker() -> OffsetTracker:
    tracker = OffsetTracker()
    tracker.assign({TP, OTHER})
    return tracker


def test_commits_only_up_to_the_first_unacknowledged_offset():
    tracker = owned_tracker()
    for offset in range(10, 15):
        tracker.track(TP, offset)
    tracker.ack(TP, 10)
    tracker.ack(TP, 12)
    tracker.ack(TP, 13)
    assert tracker.committable() == {TP: 11}
    tracker.ack(TP, 11)
    assert tracker.committable() == {TP: 14}
    assert tracker.in_flight == 1


def test_nothing_to_commit_until_an_ack_and_no_repeat_after_commit():
    tracker = owned_tracker()
    tracker.track(TP, 0)
    assert tracker.committable() == {}
    tracker.ack(TP, 0)
    assert tracker.committable() == {TP: 1}
    tracker.mark_committed({TP: 1})
    assert tracker.committable() == {}


def test_partitions_are_independent():
    tracker = owned_tracker()
    tracker.track(TP, 0)
    tracker.track(OTHER, 5)
    tracker.ack(OTHER, 5)
    assert tracker.committable() == {OTHER: 6}


def test_revoked_partition_is_never_committed_and_late_acks_are_ignored():
    tracker = owned_tracker()
    tracker.track(TP, 0)
    tracker.track(TP, 1)
    tracker.revoke({TP})
    tracker.ack(TP, 0)
    assert tracker.committable() == {}
    assert tracker.in_flight == 0
    assert tracker.track(TP, 2) is False


def test_reassigned_partition_starts_clean():
    tracker = owned_tracker()
    tracker.track(TP, 7)
    tracker.assign({TP})
    assert tracker.in_flight == 0
    tracker.track(TP, 3)
    tracker.ack(TP, 3)
    assert tracker.committable() == {TP: 4}


def test_duplicate_ack_does_not_advance_past_pending_work():
    tracker = owned_tracker()
    for offset in (0, 1, 2):
        tracker.track(TP, offset)
    tracker.ack(TP, 0)
    tracker.ack(TP, 0)
    assert tracker.committable() == {TP: 1}
    assert tracker.in_flight == 2


def test_in_flight_bytes_and_positions_follow_polls_and_acks():
    tracker = owned_tracker()
    tracker.track(TP, 0, size=100)
    tracker.track(TP, 1, size=50)
    assert tracker.in_flight_bytes == 150
    assert tracker.positions() == {TP: 2}
    tracker.ack(TP, 1)
    assert tracker.in_flight_bytes == 150, "out-of-order ack: still pending behind offset 0"
    tracker.ack(TP, 0)
    assert tracker.in_flight_bytes == 0
    tracker.track(OTHER, 9, size=10)
    tracker.revoke({OTHER})
    assert tracker.in_flight_bytes == 0


def test_rewind_returns_the_committed_offset_and_forgets_uncommitted_progress():
    tracker = owned_tracker()
    for offset in range(5):
        tracker.track(TP, offset)
        tracker.ack(TP, offset)
    tracker.mark_committed(tracker.committable())
    for offset in range(5, 9):
        tracker.track(TP, offset)
    tracker.ack(TP, 5)
    tracker.track(OTHER, 20)
    assert tracker.rewind() == {TP: 5, OTHER: 20}  # OTHER never committed: back to its first polled offset
    assert tracker.in_flight == 0
    assert tracker.committable() == {}
    tracker.track(TP, 5)  # read again after the seek
    tracker.ack(TP, 5)
    assert tracker.committable() == {TP: 6}
