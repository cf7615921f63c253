"""Hostile things under ``--fetch-file-root`` and fetches that never end, against a real broker.

A FIFO, a socket, a device and a directory, each followed by an inline image: typed dead letters, the
image after each embedded (a FIFO's open used to wait for a writer and stall its partition for good). A
fetch stuck on a store that never answers: SIGTERM exits 0 within the grace period, the stuck record is
not committed, and the restarted worker reads it again (and does not hang on it).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.kafka_helpers import (
    CLI,
    clean_env,
    collect,
    committed_offsets,
    create_topics,
    produce,
    running_worker,
    topic_flags,
    wait_until,
    worker_settings,
)
from tests.support.object_store import S3_ENV
from tests.support.silent import SilentServer
from tests.support.special_files import EXPECTED, make_special
from worker.config import Settings
from worker.devtools.samples import jpeg_corpus
from worker.inference.embedder import Embedder
from worker.messages import ERROR_HEADER, encode_reference

pytestmark = pytest.mark.integration

GRACE_S = 8.0


def run_kinds(bootstrap: str, embedder: Embedder, root: Path, kinds: list[str]) -> None:
    """Each kind's reference then an inline image, in one partition, through a worker: every kind
    dead-lettered with its reason, every image embedded, every offset committed."""
    settings = worker_settings(bootstrap, fetch_file_root=root, fetch_timeout_s=5.0, fetch_retries=0)
    create_topics(settings)
    (root / "cat.jpg").write_bytes(jpeg_corpus(1, 64, 48)[0])
    images = jpeg_corpus(len(kinds), 64, 48, 1)
    items: list[tuple[str, bytes]] = [("raw:file", encode_reference("raw:file", f"file://{root}/cat.jpg"))]
    for kind, image in zip(kinds, images, strict=True):
        path = make_special(root / kind, kind)
        items += [
            (f"raw:{kind}", encode_reference(f"raw:{kind}", f"file://{path}")),
            (f"after-{kind}", image),
        ]
    produce(settings, items)
    with running_worker(settings, embedder):
        results = collect(settings, expected=len(items), timeout_s=60, settle_s=0.5)
        wait_until(
            lambda: committed_offsets(settings, 1) == {0: len(items)}, 30, "not every offset was committed"
        )
    assert results.reasons() == {f"raw:{kind}": EXPECTED[kind][0] for kind in kinds}
    for message in results.dead:
        kind = message.key.decode().removeprefix("raw:")
        assert EXPECTED[kind][1] in dict(message.headers)[ERROR_HEADER].decode()
    assert Counter(r["id"] for r in results.outputs) == Counter(["raw:file", *(f"after-{k}" for k in kinds)])


def test_a_fifo_a_socket_and_a_directory_are_dead_lettered_and_the_image_after_each_embedded(
    kafka_bootstrap, tiny_embedder, tmp_path
):
    run_kinds(kafka_bootstrap, tiny_embedder, tmp_path, ["fifo", "socket", "directory"])


def test_a_device_is_dead_lettered_and_the_image_after_it_embedded(kafka_bootstrap, tiny_embedder, tmp_path):
    run_kinds(kafka_bootstrap, tiny_embedder, tmp_path, ["device"])


def test_sigterm_with_a_fetch_stuck_exits_zero_within_the_grace_and_the_record_is_read_again(
    kafka_bootstrap, tiny_embedder, tiny_clip_dir, tmp_path, monkeypatch
):
    before, after = jpeg_corpus(2, 64, 48)
    with SilentServer() as store:
        # The restarted worker's settings: the same group, a short deadline for the store that never answers.
        settings = worker_settings(
            kafka_bootstrap, s3_endpoint_url=store.url, fetch_timeout_s=0.5, fetch_retries=0
        )
        create_topics(settings)
        stuck = encode_reference("raw:stuck", "s3://images/stuck.jpg")
        produce(settings, [("before", before), ("raw:stuck", stuck), ("after", after)])
        process, log_path = start_cli_worker(settings, tiny_clip_dir, store.url, tmp_path)
        try:

            def stuck_after_the_first_commit() -> bool:
                assert process.poll() is None, tail(log_path)
                return store.requests == 1 and committed_offsets(settings, 1) == {0: 1}

            wait_until(stuck_after_the_first_commit, 120, lambda: "no stuck fetch\n" + tail(log_path))
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=GRACE_S + 20)
            stopped_in = time.monotonic() - started
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert code == 0, tail(log_path)
        assert stopped_in < GRACE_S, f"stopped {stopped_in:.1f}s after SIGTERM\n{tail(log_path)}"
        assert "gave up on 2 record(s) still being fetched" in log_path.read_text()
        assert committed_offsets(settings, 1) == {0: 1}, "the stuck record (and the one after) not committed"

        for name, value in S3_ENV.items():
            monkeypatch.setenv(name, value)
        with running_worker(settings, tiny_embedder):  # it must stop cleanly: it does not hang on the record
            results = collect(settings, expected=3, timeout_s=60, settle_s=0.5)
            wait_until(lambda: committed_offsets(settings, 1) == {0: 3}, 30, "the restart did not commit")
    assert results.reasons() == {"raw:stuck": "fetch_timeout"}
    assert sorted(r["id"] for r in results.outputs) == ["after", "before"], "each image embedded once"


def start_cli_worker(
    settings: Settings, model_dir: Path, store_url: str, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    """``clip-worker run`` in its own process, S3 fetches going to ``store_url`` with a deadline far off."""
    log_path = tmp_path / "worker.log"
    flags = [
        *topic_flags(settings),
        "--model", str(model_dir),
        "--device", "cpu",
        "--batch-size", "8",
        "--batch-timeout-ms", "100",
        "--commit-interval-ms", "200",
        "--session-timeout-ms", "6000",
        "--metrics-port", "0",
        "--s3-endpoint-url", store_url,
        "--fetch-timeout-s", "600",
        "--fetch-retries", "0",
        "--shutdown-grace-s", str(GRACE_S),
    ]  # fmt: skip
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*CLI, "run", *flags], stdout=log, stderr=subprocess.STDOUT, env=clean_env(**S3_ENV)
        )
    return process, log_path


def tail(log_path: Path, lines: int = 15) -> str:
    """The worker's last log lines, for a failure message."""
    return "\n".join(log_path.read_text().splitlines()[-lines:])
