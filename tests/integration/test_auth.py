"""A broker with a SASL_SSL listener (SCRAM-SHA-256 over TLS): right credentials work, wrong ones stop the
worker with a clear line, and the password never shows in logs, metrics or errors; on each Kafka client."""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kafka_broker import ApacheKafka, SecureListener
from tests.support.kafka_helpers import (
    CLI,
    KAFKA_CLIENTS,
    clean_env,
    collect,
    create_topics,
    produce,
    topic_flags,
    wait_until,
    worker_settings,
)
from tests.support.tls import make_tls
from worker.devtools.brokers import free_port
from worker.devtools.samples import jpeg_corpus

pytestmark = pytest.mark.integration
USER = "clip-user"
PASSWORD = "s3cret-Pa55word-do-not-log"


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafka]:
    workdir = tmp_path_factory.mktemp("secure-kafka")
    listener = SecureListener(make_tls(workdir / "tls"), USER, PASSWORD)
    broker = ApacheKafka(workdir, secure=listener).start()
    try:
        yield broker
    finally:
        broker.stop()


def run_secure_worker(
    broker: ApacheKafka, settings, model: Path, password: str, log: Path, kafka_client: str, *extra: str
):
    assert broker.secure is not None
    env = clean_env(CLIP_WORKER_SASL_PASSWORD=password)
    command = [
        *CLI, "run", "--model", str(model), "--device", "cpu",
        *topic_flags(settings, bootstrap=f"127.0.0.1:{broker.secure_port}"),
        "--security-protocol", "SASL_SSL", "--sasl-mechanism", "SCRAM-SHA-256", "--sasl-username", USER,
        "--ssl-cafile", str(broker.secure.tls.ca_cert), "--session-timeout-ms", "6000",
        "--log-level", "debug", "--kafka-client", kafka_client, *extra,
    ]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


@KAFKA_CLIENTS
def test_right_credentials_embed_and_the_password_never_leaks(
    secure_broker, tiny_clip_dir, tmp_path, kafka_client
):
    settings = worker_settings(secure_broker.bootstrap_servers)  # admin and test clients use PLAINTEXT
    create_topics(settings)
    produce(settings, [(f"secure-{i}.jpg", data) for i, data in enumerate(jpeg_corpus(6, 96, 64))])
    port = free_port()
    log = tmp_path / "worker.log"
    worker = run_secure_worker(
        secure_broker,
        settings,
        tiny_clip_dir,
        PASSWORD,
        log,
        kafka_client,
        "--metrics-port",
        str(port),
        "--metrics-host",
        "127.0.0.1",
    )
    try:
        results = collect(settings, expected=6, timeout_s=90)
        assert len(results.outputs) == 6, log.read_text()[-3000:]
        wait_until(lambda: b"clip_worker_records_published_total 6.0" in _metrics(port), 30, "metrics")
        exposition = _metrics(port)
    finally:
        worker.terminate()
        assert worker.wait(timeout=60) == 0
    text = log.read_text()
    assert PASSWORD not in text
    assert "sasl_password" in text and "**********" in text, "the resolved configuration shows it masked"
    assert PASSWORD.encode() not in exposition


@KAFKA_CLIENTS
def test_wrong_password_exits_non_zero_with_a_clear_line(
    secure_broker, tiny_clip_dir, tmp_path, kafka_client
):
    settings = worker_settings(secure_broker.bootstrap_servers)
    create_topics(settings)
    log = tmp_path / "worker.log"
    worker = run_secure_worker(
        secure_broker,
        settings,
        tiny_clip_dir,
        "wrong-" + PASSWORD,
        log,
        kafka_client,
        "--metrics-port",
        "0",
        "--connect-timeout-s",
        "15",
    )
    code = worker.wait(timeout=120)
    text = log.read_text()
    assert code == 2, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert "authentication" in last.lower() and "--sasl-username" in last, last
    assert "wrong-" + PASSWORD not in text and PASSWORD not in text


def _metrics(port: int) -> bytes:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return bytes(response.read())
    except OSError:
        return b""
