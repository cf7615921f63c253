"""Counts ids on the output and DLQ topics while a fault test runs."""

from __future__ import annotations

import threading
import time
from collections import Counter

from kafka import KafkaConsumer

from worker.config import Settings
from worker.messages import decode_embedding


class Tally:
    """A background reader of the output and DLQ topics (from the start) that counts every id it sees.

    ``read_committed`` skips records of aborted (and not yet committed) transactions, as a downstream
    consumer of the exactly-once mode would.
    """

    def __init__(self, settings: Settings, read_committed: bool = False) -> None:
        self.ids: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_bytes=64 * 1024 * 1024,
            isolation_level="read_committed" if read_committed else "read_uncommitted",
        )
        self._consumer.subscribe([settings.output_topic, settings.dlq_topic])
        self._output_topic = settings.output_topic
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batches = self._consumer.poll(timeout_ms=200)
            except Exception:  # the broker may be restarting under a fault test
                time.sleep(0.5)
                continue
            for messages in batches.values():
                for message in messages:
                    if message.topic == self._output_topic:
                        key = decode_embedding(message.value)["id"]
                    else:
                        key = message.key.decode()
                    with self._lock:
                        self.ids[key] += 1

    def distinct(self) -> int:
        """Ids seen at least once."""
        with self._lock:
            return len(self.ids)

    def records(self) -> int:
        """Records seen, duplicates included."""
        with self._lock:
            return sum(self.ids.values())

    def snapshot(self) -> Counter[str]:
        """A copy of the counts."""
        with self._lock:
            return Counter(self.ids)

    def wait_for(self, count: int, timeout_s: float) -> bool:
        """Wait until ``count`` distinct ids were seen."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.distinct() >= count:
                return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        """Stop reading."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._consumer.close()


def assert_exactly_once(seen: dict[str, int], expected: set[str]) -> None:
    """Every expected id seen once, and nothing else."""
    missing = expected - set(seen)
    repeated = {key: count for key, count in seen.items() if count > 1}
    assert not missing, f"{len(missing)} id(s) lost, e.g. {sorted(missing)[:5]}"
    assert not repeated, f"{len(repeated)} id(s) seen more than once, e.g. {sorted(repeated.items())[:5]}"
    assert set(seen) == expected
