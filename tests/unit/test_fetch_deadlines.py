"""Every fetch under one deadline, whatever its scheme: file:// refuses what is not a regular file without
waiting on it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.special_files import EXPECTED, make_special
from worker.errors import RejectedRecord, RejectReason
from worker.fetching.fetcher import Fetcher, FetchPolicy
from worker.fetching.retry import RetryPolicy
from worker.metrics import WorkerMetrics

FAST = RetryPolicy(base_delay_s=0.01, max_delay_s=0.02)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    shared = tmp_path / "root"
    shared.mkdir()
    (shared / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    return shared


@pytest.fixture
def fetchers() -> Iterator[list[Fetcher]]:
    made: list[Fetcher] = []
    yield made
    for fetcher in made:
        fetcher.close()


def file_fetcher(made: list[Fetcher], root: Path, metrics: WorkerMetrics | None = None, **policy) -> Fetcher:
    policy.setdefault("timeout_s", 2.0)
    policy.setdefault("retries", 0)
    fetcher = Fetcher(
        FetchPolicy(schemes=frozenset({"file"}), file_root=root, backoff=FAST, **policy),
        metrics or WorkerMetrics(),
    )
    made.append(fetcher)
    return fetcher


def rejection(fetcher: Fetcher, uri: str) -> RejectedRecord:
    """How fetching ``uri`` failed; a fetch that hangs fails the test after 10 s."""
    with pytest.raises(RejectedRecord) as caught:
        fetcher.loop.run(fetcher.fetch(uri)).result(timeout=10)
    return caught.value


# --- file:// kinds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_what_is_not_a_regular_file_is_refused_at_once_with_its_kind_named(root, fetchers, kind):
    path = make_special(root / kind[:4], kind)
    fetcher = file_fetcher(fetchers, root)
    started = time.monotonic()
    refused = rejection(fetcher, f"file://{path}")
    reason, words = EXPECTED[kind]
    assert (refused.reason.value, words in refused.message) == (reason, True), refused.message
    assert time.monotonic() - started < 1.0, "refused without waiting, not after the fetch deadline"
    assert fetcher.fetch_blocking(f"file://{root}/cat.jpg") == b"\xff\xd8 a cat"


def test_a_fifo_with_a_writer_that_never_writes_is_refused_too(root, fetchers):
    fifo = make_special(root / "pipe", "fifo")
    writer = threading.Thread(target=lambda: fifo.open("wb").close(), daemon=True)  # blocks until a reader
    writer.start()
    refused = rejection(file_fetcher(fetchers, root), f"file://{fifo}")
    assert refused.reason is RejectReason.FETCH_FORBIDDEN
    assert writer.is_alive(), "the fetcher never opened the FIFO for reading"
    with open(fifo, "rb"):  # let the writer go
        pass
    writer.join(5)
