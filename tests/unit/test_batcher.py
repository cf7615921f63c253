from worker.intake.batcher import Batcher, CloseCause


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_batch_closes_at_size():
    batcher: Batcher[int] = Batcher(3, 1.0, FakeClock())
    assert batcher.add(1) is None
    assert batcher.add(2) is None
    batch = batcher.add(3)
    assert batch is not None
    assert batch.items == [1, 2, 3]
    assert batch.cause is CloseCause.SIZE
    assert len(batcher) == 0


def test_partial_batch_closes_when_oldest_item_times_out():
    clock = FakeClock()
    batcher: Batcher[str] = Batcher(10, 0.5, clock)
    batcher.add("a")
    clock.now += 0.3
    batcher.add("b")
    assert batcher.take_if_due() is None
    assert batcher.seconds_until_due() == 0.2 or abs(batcher.seconds_until_due() - 0.2) < 1e-9  # type: ignore[operator]
    clock.now += 0.2
    batch = batcher.take_if_due()
    assert batch is not None
    assert batch.items == ["a", "b"]
    assert batch.cause is CloseCause.TIMEOUT


def test_deadline_restarts_with_the_next_batch():
    clock = FakeClock()
    batcher: Batcher[int] = Batcher(2, 1.0, clock)
    batcher.add(1)
    clock.now += 0.9
    assert batcher.add(2) is not None
    clock.now += 0.5
    batcher.add(3)
    assert batcher.take_if_due() is None  # the new batch's oldest item waited only 0 s
    clock.now += 1.0
    assert batcher.take_if_due() is not None


def test_empty_batcher_is_never_due_and_drains_to_none():
    batcher: Batcher[int] = Batcher(4, 0.0, FakeClock())
    assert batcher.seconds_until_due() is None
    assert batcher.take_if_due() is None
    assert batcher.drain() is None


def test_drain_returns_partial_batch():
    batcher: Batcher[int] = Batcher(4, 10.0, FakeClock())
    batcher.add(7)
    batch = batcher.drain()
    assert batch is not None
    assert batch.items == [7]
    assert batch.cause is CloseCause.DRAIN


def test_zero_timeout_makes_every_partial_batch_due_at_once():
    batcher: Batcher[int] = Batcher(4, 0.0, FakeClock())
    batcher.add(1)
    batch = batcher.take_if_due()
    assert batch is not None
    assert batch.items == [1]
