"""Restarts, consumer groups, SIGTERM and health endpoints against a real broker, on each Kafka client (the
drain on SIGHUP, the same code path as SIGTERM's, on kafka-python only)."""

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from tests.support.kafka_helpers import (
    KAFKA_CLIENTS,
    clean_env,
    collect,
    committed_offsets,
    create_topics,
    produce,
    running_worker,
    start_worker,
    wait_until,
    worker_settings,
)
from worker.devtools.brokers import free_port
from worker.devtools.samples import jpeg_corpus, sample_images

pytestmark = pytest.mark.integration


def named(prefix: str, count: int, offset: int = 0) -> list[tuple[str, bytes]]:
    return [
        (f"{prefix}-{offset + i:04d}.jpg", data)
        for i, data in enumerate(jpeg_corpus(count, 160, 120, offset))
    ]


@KAFKA_CLIENTS
def test_restart_resumes_from_committed_offsets(kafka_bootstrap, tiny_embedder, kafka_client):
    settings = worker_settings(kafka_bootstrap, kafka_client=kafka_client)
    create_topics(settings, partitions=2)
    first = named("first", 40)
    produce(settings, first)
    with running_worker(settings, tiny_embedder):
        assert len(collect(settings, expected=40, timeout_s=60).outputs) == 40
    assert sum(v or 0 for v in committed_offsets(settings, 2).values()) == 40

    second = named("second", 30)
    produce(settings, second)
    with running_worker(settings, tiny_embedder) as again:
        results = collect(settings, expected=70, timeout_s=60, settle_s=2.0)
        embedded_after_restart = again.metrics.embedded._value.get()
    ids = Counter(r["id"] for r in results.outputs)
    assert set(ids) == {name for name, _ in first + second}, "nothing lost across the restart"
    assert embedded_after_restart == 30, "the restarted worker resumed after the committed offsets"
    assert max(ids.values()) == 1


@KAFKA_CLIENTS
def test_two_workers_in_one_group_split_partitions_and_cover_everything(
    kafka_bootstrap, tiny_embedder, kafka_client
):
    settings = worker_settings(kafka_bootstrap, batch_size=4, kafka_client=kafka_client)
    create_topics(settings, partitions=4)
    one = start_worker(settings, tiny_embedder)
    two = start_worker(settings, tiny_embedder)
    try:

        def split() -> bool:
            a: float = one.metrics.assigned_partitions._value.get()
            b: float = two.metrics.assigned_partitions._value.get()
            return a >= 1 and b >= 1 and a + b == 4

        wait_until(split, 60, "the group did not split 4 partitions between 2 workers")
        items = named("pair", 120)
        for partition in range(4):
            produce(settings, items[partition::4], partition=partition)
        results = collect(settings, expected=120, timeout_s=90, settle_s=1.0)
    finally:
        assert one.shutdown() == 0
        assert two.shutdown() == 0
    assert Counter(r["id"] for r in results.outputs) == Counter(name for name, _ in items)
    assert one.metrics.embedded._value.get() > 0
    assert two.metrics.embedded._value.get() > 0
    assert one.metrics.embedded._value.get() + two.metrics.embedded._value.get() >= 120


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""  # not listening yet


@pytest.mark.parametrize(
    ("signum", "kafka_client"),
    [
        (signal.SIGTERM, "kafka-python"),
        (signal.SIGHUP, "kafka-python"),
        (signal.SIGTERM, "librdkafka"),
    ],
    ids=["SIGTERM", "SIGHUP", "SIGTERM-librdkafka"],
)
def test_stop_signal_drains_commits_and_exits_zero(
    kafka_bootstrap, tiny_clip_dir, tmp_path, signum, kafka_client
):
    settings = worker_settings(kafka_bootstrap, batch_size=32, batch_timeout_ms=2000)
    create_topics(settings)
    port = free_port()
    env = clean_env()
    env.update(
        {
            "CLIP_WORKER_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "CLIP_WORKER_INPUT_TOPIC": settings.input_topic,
            "CLIP_WORKER_OUTPUT_TOPIC": settings.output_topic,
            "CLIP_WORKER_DLQ_TOPIC": settings.dlq_topic,
            "CLIP_WORKER_GROUP_ID": settings.group_id,
            "CLIP_WORKER_SESSION_TIMEOUT_MS": "6000",
            "CLIP_WORKER_LOG_FORMAT": "json",
            "CLIP_WORKER_KAFKA_CLIENT": kafka_client,
        }
    )
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.cli",
                "run",
                "--model",
                str(tiny_clip_dir),
                "--device",
                "cpu",
                "--batch-size",
                "32",
                "--batch-timeout-ms",
                "5000",
                "--metrics-port",
                str(port),
                "--metrics-host",
                "127.0.0.1",
                "--commit-interval-ms",
                "60000",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_until(lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 60, "worker never became ready")
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        produce(settings, [(s.name, s.data) for s in sample_images(10)])

        def consumed_all() -> bool:
            status, body = get(f"http://127.0.0.1:{port}/metrics")
            return status == 200 and "clip_worker_messages_consumed_total 10.0" in body

        wait_until(consumed_all, 30, "worker did not consume the 10 records")
        # 10 images sit in a partial batch (size 32, timeout 5 s) and nothing is committed yet.
        started = time.monotonic()
        process.send_signal(signum)
        code = process.wait(timeout=30)
        drained_in = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
    log_lines = log_path.read_text().splitlines()
    assert code == 0, log_lines[-10:]
    assert drained_in < 5, "the partial batch is embedded at once on SIGTERM, not after its timeout"
    assert all(json.loads(line)["message"] for line in log_lines if line.startswith("{"))
    assert len(collect(settings, expected=10, timeout_s=30).outputs) == 10
    assert committed_offsets(settings, 1) == {0: 10}
