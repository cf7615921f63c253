"""Operator mistakes end in one line naming the fix; the metrics server cannot be pinned or made noisy."""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from worker.config import load_settings
from worker.errors import RejectReason, StartupError
from worker.messages import REASON_HEADER, Source, dlq_headers
from worker.ops.health import HealthState
from worker.ops.logs import RepeatLimiter
from worker.ops.metrics import WorkerMetrics
from worker.ops.server import MAX_CONNECTIONS, MetricsServer
from worker.work import BrokerWatch


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"group_id": ""}, "--group-id"),
        ({"group_id": "   "}, "--group-id"),
        ({"input_topic": ""}, "--input-topic"),
        ({"input_topic": "images with spaces"}, "--input-topic"),
        ({"output_topic": ".."}, "--output-topic"),
        ({"dlq_topic": "x" * 250}, "--dlq-topic"),
        ({"group_instance_id": ""}, "--group-instance-id"),
    ],
)
def test_bad_names_stop_startup_in_one_line(overrides, names):
    with pytest.raises(StartupError) as error:
        load_settings(overrides, environ={})
    message = str(error.value)
    assert names in message and "\n" not in message


def test_passwords_come_from_files_and_never_show(tmp_path: Path):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    sasl = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u"}
    settings = load_settings({**sasl, "sasl_password_file": str(secret)}, environ={})
    assert settings.sasl_password is not None and settings.sasl_password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings.redacted())
    env = {"CLIP_WORKER_SSL_PASSWORD_FILE": str(secret)}
    assert load_settings({}, environ=env).ssl_password.get_secret_value() == "s3cret"  # type: ignore[union-attr]
    with pytest.raises(StartupError, match="--sasl-password-file"):
        load_settings({**sasl, "sasl_password_file": str(tmp_path / "missing")}, environ={})
    with pytest.raises(StartupError, match="keep one of them"):
        load_settings({**sasl, "sasl_password": "x", "sasl_password_file": str(secret)}, environ={})


def test_metrics_port_in_use_or_unknown_host_is_a_startup_error():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(StartupError, match="--metrics-port"):
            MetricsServer("127.0.0.1", taken.getsockname()[1], WorkerMetrics(), HealthState())
    finally:
        taken.close()
    with pytest.raises(StartupError, match="--metrics-host"):
        MetricsServer("no-such-host.invalid", 0, WorkerMetrics(), HealthState())


def test_idle_connections_cannot_pin_the_metrics_server(monkeypatch, capfd, caplog):
    monkeypatch.setattr("worker.ops.server.CONNECTION_TIMEOUT_S", 1.0)
    server = MetricsServer("127.0.0.1", 0, WorkerMetrics(), HealthState())
    server.start()
    threads_before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
    try:
        time.sleep(0.5)  # let the server accept them all
        assert threading.active_count() <= threads_before + MAX_CONNECTIONS
        idle[0].settimeout(5)
        assert idle[0].recv(1) == b"", "an idle connection is closed after the timeout"
        # Past the cap, connections are closed at once; the idle ones time out; probes get through.
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
            assert response.status == 200
        hung_up = socket.create_connection(("127.0.0.1", server.port))
        hung_up.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        hung_up.close()  # the reply meets a closed socket
    finally:
        for connection in idle:
            connection.close()
        server.stop()
    # socketserver's own handler prints this with a traceback; the worker's goes through logging.
    assert "Exception occurred during processing of request" not in capfd.readouterr().err


def test_repeated_library_lines_are_held_back_and_counted():
    now = [0.0]
    limiter = RepeatLimiter("kafka", interval_s=30, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("kafka.cluster", logging.ERROR, "", 0, msg, None, None)

    assert limiter.filter(record("Topic %s not found"))
    assert not any(limiter.filter(record("Topic %s not found")) for _ in range(300))
    assert limiter.filter(record("another message"))
    now[0] = 31.0
    again = record("Topic %s not found")
    assert limiter.filter(again)
    assert "300 more like it" in str(again.msg)
    own = [
        logging.LogRecord("worker.loop.pipeline", logging.WARNING, "", 0, "same", None, None)
        for _ in range(3)
    ]
    assert all(limiter.filter(line) for line in own), "the worker's own lines are never held back"


def test_broker_silence_counts_only_unanswered_sends():
    now = [0.0]
    watch = BrokerWatch(clock=lambda: now[0])
    now[0] = 100.0  # a long decode: nothing was sent, the broker owes nothing
    assert watch.silent_for() == 0
    watch.sent()
    now[0] = 103.0
    assert watch.silent_for() == 3.0
    watch.answered()
    assert watch.silent_for() == 0
    watch.sent()
    now[0] = 110.0
    watch.unanswered()  # a timeout: its retry waits, the silence goes on
    assert watch.silent_for() == 7.0


def test_dead_letters_keep_other_clip_worker_headers_and_replace_their_own():
    original = [(REASON_HEADER, b"corrupt_image"), ("clip-worker-trace", b"t1"), ("app", b"a")]
    headers = dlq_headers(original, RejectReason.NOT_AN_IMAGE, "why", Source("images", 0, 1))
    assert ("clip-worker-trace", b"t1") in headers and ("app", b"a") in headers
    assert [value for name, value in headers if name == REASON_HEADER] == [b"not_an_image"]
