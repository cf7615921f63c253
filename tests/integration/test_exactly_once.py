"""Exactly-once mode against a real Apache Kafka: read_committed consumers see each id exactly once.

Short variants run in CI; FAULTS_LONG=1 runs the sizes of docs/reliability.md. Each test prints a FIGURES
line.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_faults import figures, images, kill_and_restart, stop_all, worker_process
from tests.support.bad_inputs import bad_requests
from tests.support.kafka_helpers import (
    KAFKA_CLIENTS,
    RunningWorker,
    committed_offsets,
    create_topics,
    produce,
    produce_steadily,
    start_worker,
    worker_settings,
)
from tests.support.tally import Tally, assert_exactly_once
from worker.commands.produce_tail import tail_topic
from worker.config import Settings

pytestmark = pytest.mark.integration
LONG = os.environ.get("FAULTS_LONG") == "1"


def exactly_once_settings(bootstrap: str, **overrides: Any) -> Settings:
    return worker_settings(bootstrap, exactly_once=True, **overrides)


@KAFKA_CLIENTS
def test_round_trip_publishes_each_result_once_with_its_offsets(kafka_bootstrap, tiny_embedder, kafka_client):
    settings = exactly_once_settings(
        kafka_bootstrap, transactional_id=f"eos-round-trip-{kafka_client}", kafka_client=kafka_client
    )
    create_topics(settings, partitions=3)
    good = images("eos", 300)
    bad = [(key, value) for key, value, _reason in bad_requests()]
    produce(settings, good + bad)
    expected = {name for name, _ in good} | {name for name, _ in bad}
    tally = Tally(settings, read_committed=True)
    worker = start_worker(settings, tiny_embedder)
    try:
        assert tally.wait_for(len(expected), 120), f"only {tally.distinct()} of {len(expected)} ids arrived"
        time.sleep(1.0)
    finally:
        code = worker.shutdown(timeout_s=60)
        tally.close()
    assert code == 0
    assert_exactly_once(tally.snapshot(), expected)
    printed = io.StringIO()
    tail_topic(settings, max_records=len(good), idle_timeout_s=10, read_committed=True, out=printed)
    assert sorted(json.loads(line)["id"] for line in printed.getvalue().splitlines()) == sorted(
        name for name, _ in good
    )
    assert sum(v or 0 for v in committed_offsets(settings, 3).values()) == len(expected)
    assert worker.metrics.commits._value.get() > 0


@KAFKA_CLIENTS
def test_kill_nine_read_committed_sees_each_id_exactly_once(
    kafka_bootstrap, tiny_clip_dir, tmp_path: Path, kafka_client
):
    kills = 5 if LONG else 2
    total = 5000 if LONG else 1200
    settings = exactly_once_settings(kafka_bootstrap, kafka_client=kafka_client)
    create_topics(settings, partitions=6)
    committed_view = Tally(settings, read_committed=True)
    raw_view = Tally(settings)  # also sees the records of aborted and still open transactions
    flags = ["--exactly-once", "--commit-interval-ms", "1000"]

    def launch(index: int) -> subprocess.Popen[bytes]:
        log = tmp_path / f"w{index}.log"
        transactional_id = f"eos-kill-{kafka_client}-{index}"
        return worker_process(settings, tiny_clip_dir, log, *flags, "--transactional-id", transactional_id)

    workers = [launch(i) for i in range(2)]
    items = images("eos-kill", total)
    # 40 images/s: slow enough that every kill lands while images still arrive, on a loaded machine too.
    producer = produce_steadily(settings, items, seconds=total / 40)
    try:
        # Each kill lands while a transaction holds records that are not committed yet.
        recoveries = kill_and_restart(
            workers,
            launch,
            committed_view,
            total,
            kills,
            ready_to_kill=lambda: raw_view.records() > committed_view.records(),
        )
        producer.join(timeout=120)
        assert committed_view.wait_for(total, 180), f"only {committed_view.distinct()} of {total} ids arrived"
        time.sleep(2.0)
    finally:
        stop_all(workers)
        committed_view.close()
        raw_view.close()
    seen = committed_view.snapshot()
    aborted = raw_view.records() - committed_view.records()
    figures(
        "exactly-once kill-9",
        total,
        seen,
        kills=kills,
        aborted_records=aborted,
        recovery_s=recoveries,
        client=kafka_client,
    )
    assert_exactly_once(seen, {name for name, _ in items})
    # The kills did interrupt transactions: a read_uncommitted reader saw their (aborted) records.
    assert aborted > 0


@KAFKA_CLIENTS
def test_churn_read_committed_sees_each_id_exactly_once(kafka_bootstrap, tiny_embedder, kafka_client):
    rounds = 6 if LONG else 3
    total = 3000 if LONG else 900
    base = exactly_once_settings(kafka_bootstrap, batch_size=8, kafka_client=kafka_client)
    create_topics(base, partitions=6)
    values = base.model_dump()
    serial = iter(range(1000))

    def join() -> RunningWorker:
        txn_id = f"eos-churn-{next(serial)}"
        settings = worker_settings(kafka_bootstrap, **{**values, "transactional_id": txn_id})
        return start_worker(settings, tiny_embedder)

    tally = Tally(base, read_committed=True)
    workers = [join() for _ in range(3)]
    everyone = list(workers)
    items = images("eos-churn", total)
    chunk = total // rounds
    try:
        for r in range(rounds):
            produce(base, items[r * chunk : (r + 1) * chunk if r < rounds - 1 else total])
            time.sleep(2.0)
            leaving = workers.pop(0)
            assert leaving.shutdown(timeout_s=60) == 0
            workers.append(join())
            everyone.append(workers[-1])
        assert tally.wait_for(total, 180), f"only {tally.distinct()} of {total} ids arrived"
        time.sleep(2.0)
    finally:
        for worker in workers:
            worker.shutdown(timeout_s=60)
        tally.close()
    seen = tally.snapshot()
    aborted = sum(
        sample.value
        for worker in everyone
        for metric in worker.metrics.transactions_aborted.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
    figures("exactly-once churn", total, seen, rounds=rounds, aborted_transactions=int(aborted))
    assert_exactly_once(seen, {name for name, _ in items})
    assert sum(v or 0 for v in committed_offsets(base, 6).values()) == total
