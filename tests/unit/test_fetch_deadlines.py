"""Every fetch under one deadline, whatever its scheme: file:// refuses what is not a regular file without
waiting on it, a blocking try that never returns answers ``fetch_timeout``, its thread never keeps the
process from exiting, and the drain gives up a fetch stuck past half the grace period without committing
its record."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_kafka import FakeProducer
from tests.support.object_store import S3_ENV
from tests.support.silent import SilentServer
from tests.support.special_files import EXPECTED, make_special
from tests.unit.test_pipeline import TP, build, run_until
from worker.devtools.samples import jpeg_corpus
from worker.errors import RejectedRecord, RejectReason
from worker.fetching.fetcher import Fetcher, FetchPolicy
from worker.fetching.files import FileFetcher
from worker.fetching.retry import RetryPolicy
from worker.fetching.threads import DaemonThreads
from worker.messages import encode_reference, encode_request
from worker.ops.metrics import WorkerMetrics

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


# --- deadlines --------------------------------------------------------------------------------------


def test_a_blocking_try_that_never_returns_is_fetch_timeout_on_every_try(root, fetchers, monkeypatch):
    release = threading.Event()
    tries: list[threading.Thread] = []

    def stuck(_self: FileFetcher, _reference: object) -> bytes:
        tries.append(threading.current_thread())
        release.wait()
        return b""

    monkeypatch.setattr(FileFetcher, "fetch", stuck)
    metrics = WorkerMetrics()
    fetcher = file_fetcher(fetchers, root, metrics, timeout_s=0.3, retries=1)
    started = time.monotonic()
    try:
        refused = rejection(fetcher, f"file://{root}/cat.jpg")
    finally:
        release.set()
    elapsed = time.monotonic() - started
    assert refused.reason is RejectReason.FETCH_TIMEOUT and "no answer within 0.3s" in refused.message
    assert 0.6 <= elapsed < 2.0, "two tries of 0.3 s each"
    assert len(tries) == 2 and all(thread.daemon for thread in tries)
    assert metrics.registry.get_sample_value("clip_worker_fetch_retries_total", {"scheme": "file"}) == 1


def test_an_s3_store_that_never_answers_is_fetch_timeout_within_the_deadline(fetchers, monkeypatch):
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    with SilentServer() as silent:
        fetcher = Fetcher(
            FetchPolicy(schemes=frozenset({"s3"}), s3_endpoint_url=silent.url, timeout_s=0.5, retries=0),
            WorkerMetrics(),
        )
        fetchers.append(fetcher)
        started = time.monotonic()
        refused = rejection(fetcher, "s3://images/stuck.jpg")
        assert refused.reason is RejectReason.FETCH_TIMEOUT
        assert time.monotonic() - started < 2.0
        assert silent.requests == 1


_EXITS_WITH_A_TRY_STUCK = """
    import sys
    import threading
    from pathlib import Path

    from worker.errors import RejectedRecord
    from worker.fetching.fetcher import Fetcher, FetchPolicy
    from worker.fetching.files import FileFetcher
    from worker.ops.metrics import WorkerMetrics

    FileFetcher.fetch = lambda self, reference: threading.Event().wait() and b""  # stuck for good
    root = Path(sys.argv[1])
    policy = FetchPolicy(schemes=frozenset({"file"}), file_root=root, timeout_s=0.2, retries=0)
    fetcher = Fetcher(policy, WorkerMetrics())
    try:
        fetcher.fetch_blocking(f"file://{root}/cat.jpg")
    except RejectedRecord as rejection:
        print(rejection.reason.value, flush=True)
    fetcher.close()
"""


def test_a_process_exits_with_a_fetch_thread_stuck_for_good(root):
    # ThreadPoolExecutor's threads are joined at interpreter exit: this process then never ended.
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_EXITS_WITH_A_TRY_STUCK), str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "fetch_timeout"), done.stderr[-2000:]


def test_the_fetch_threads_are_bounded_reused_and_cancel_what_waits_at_shutdown():
    pool = DaemonThreads(2, "t")
    assert pool.submit(lambda: 1).result(5) == 1 and pool.submit(lambda: 2).result(5) == 2
    assert pool.threads == 1, "an idle thread takes the next call"
    release = threading.Event()
    stuck = [pool.submit(release.wait, 10) for _ in range(2)]
    waiting = pool.submit(lambda: 3)
    deadline = time.monotonic() + 5
    while not all(future.running() for future in stuck) and time.monotonic() < deadline:
        time.sleep(0.01)  # both threads take their call before the shutdown (else it would cancel one)
    assert all(future.running() for future in stuck), "each stuck call has a thread of its own"
    assert pool.threads == 2, "never more than max_workers, however many calls are stuck"
    pool.shutdown(wait=False, cancel_futures=True)
    assert waiting.cancelled()
    with pytest.raises(RuntimeError):
        pool.submit(lambda: 4)
    release.set()
    assert [future.result(5) for future in stuck] == [True, True]


# --- the drain --------------------------------------------------------------------------------------


def offsets_sent(producer: FakeProducer) -> list[int]:
    """The offsets of partition 0 that exactly-once transactions committed, in order."""
    return [offsets[TP] for call, offsets in producer.calls if call == "offsets" and TP in offsets]


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_the_drain_gives_up_a_stuck_fetch_within_the_grace_and_commits_only_before_it(
    exactly_once, monkeypatch
):
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    before, after = jpeg_corpus(2, 32, 24)
    with SilentServer() as silent:
        pipeline, consumer, producer = build(
            exactly_once,
            fetch_schemes="s3",
            s3_endpoint_url=silent.url,
            fetch_timeout_s=600,
            fetch_retries=0,
        )
        consumer.add("images", encode_request("before", before), key=b"before")
        consumer.add("images", encode_reference("stuck", "s3://images/stuck.jpg"), key=b"stuck")
        consumer.add("images", encode_request("after", after), key=b"after")

        def first_committed() -> bool:
            done = offsets_sent(producer) == [1] if exactly_once else consumer.committed.get(TP) == 1
            return done and silent.requests == 1

        pipeline.subscribe()
        pipeline.inference.start()
        run_until(pipeline, first_committed)
        started = time.monotonic()
        drained: list[bool] = []
        draining = threading.Thread(target=lambda: drained.append(pipeline.drain(grace_s=2.0)), daemon=True)
        draining.start()
        draining.join(10)
        drained_in = time.monotonic() - started
    assert drained, "the drain waited on the stuck fetch"
    assert drained == [True], "a record given back is no unacknowledged one"
    assert drained_in < 2.0, "the stuck fetch was given up at half the grace period"
    assert [sent.key for sent in producer.sent] == [b"before"], "neither the stuck record nor the one after"
    if exactly_once:
        assert offsets_sent(producer) == [1]
    else:
        assert consumer.committed[TP] == 1, "read again from the stuck record after the restart"
