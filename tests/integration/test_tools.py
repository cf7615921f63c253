"""``clip-worker produce`` and ``clip-worker tail`` as a user runs them, against a real broker."""

import json
import subprocess
import sys

import pytest

from tests.support.kafka_helpers import clean_env, create_topics, running_worker, worker_settings
from worker.devtools.samples import broken_samples, sample_images

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_produce_a_folder_then_tail_outputs_and_dead_letters(kafka_bootstrap, tiny_embedder, tmp_path):
    settings = worker_settings(kafka_bootstrap)
    create_topics(settings)
    (tmp_path / "album" / "nested").mkdir(parents=True)
    for index, sample in enumerate(sample_images(4)):
        folder = tmp_path / "album" / ("nested" if index % 2 else "")
        (folder / sample.name).write_bytes(sample.data)
    broken = broken_samples()[1]
    (tmp_path / "album" / broken.name).write_bytes(broken.data)
    (tmp_path / "album" / ".hidden").write_bytes(b"ignored")

    server = ["--bootstrap-servers", settings.bootstrap_servers]
    produced = cli("produce", str(tmp_path / "album"), *server, "--input-topic", settings.input_topic)
    assert produced.returncode == 0, produced.stderr
    assert "published 5 image record(s)" in produced.stdout

    with running_worker(settings, tiny_embedder):
        tailed = cli(
            "tail",
            *server,
            "--output-topic",
            settings.output_topic,
            "--max-records",
            "4",
            "--idle-timeout-s",
            "60",
        )
        dead = cli(
            "tail",
            "--dlq",
            *server,
            "--dlq-topic",
            settings.dlq_topic,
            "--max-records",
            "1",
            "--idle-timeout-s",
            "60",
        )
    lines = [json.loads(line) for line in tailed.stdout.splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(
        [s.name if i % 2 == 0 else f"nested/{s.name}" for i, s in enumerate(sample_images(4))]
    )
    for line in lines:
        assert line["dim"] == tiny_embedder.dim
        assert abs(line["norm"] - 1.0) < 1e-4
        assert len(line["head"]) == 4
        assert line["source"]["topic"] == settings.input_topic
    [dead_line] = [json.loads(line) for line in dead.stdout.splitlines()]
    assert dead_line["key"] == broken.name
    assert dead_line["reason"] == "not_an_image"


def test_produce_missing_path_is_a_one_line_error():
    result = cli("produce", "/no/such/folder", "--bootstrap-servers", "127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr.strip() == "clip-worker: error: /no/such/folder: no such file or directory"


def test_produce_by_reference_from_a_served_folder_and_an_s3_prefix(kafka_bootstrap, tiny_embedder, tmp_path):
    from tests.support.kafka_helpers import collect
    from tests.support.object_store import S3_ENV, object_store
    from worker.devtools.origin import ImageOrigin

    samples = sample_images(6)
    (tmp_path / "album" / "nested").mkdir(parents=True)
    with ImageOrigin() as origin, object_store() as store:
        for index, sample in enumerate(samples):
            relative = f"nested/{sample.name}" if index % 2 else sample.name
            (tmp_path / "album" / relative).write_bytes(sample.data)
            origin.put(relative, sample.data)
            store.put("photos", f"2024/{sample.name}", sample.data)
        settings = worker_settings(
            kafka_bootstrap, fetch_allow_hosts="127.0.0.1", s3_endpoint_url=store.endpoint_url
        )
        create_topics(settings)
        server = ["--bootstrap-servers", settings.bootstrap_servers, "--input-topic", settings.input_topic]
        by_http = cli("produce", str(tmp_path / "album"), "--by-reference", origin.url("/o/"), *server)
        assert by_http.returncode == 0, by_http.stderr
        assert "published 6 image record(s)" in by_http.stdout
        env = clean_env(**S3_ENV)
        by_s3 = subprocess.run(
            [sys.executable, "-m", "worker.cli", "produce", "--by-reference", "s3://photos/2024/", *server,
             "--s3-endpoint-url", store.endpoint_url],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        assert by_s3.returncode == 0, by_s3.stderr
        assert "published 6 image record(s)" in by_s3.stdout
        with pytest.MonkeyPatch.context() as patch:
            for name, value in S3_ENV.items():
                patch.setenv(name, value)
            with running_worker(settings, tiny_embedder):
                results = collect(settings, expected=12, timeout_s=120, settle_s=0.5)
    assert results.dead == []
    uris = sorted(record["uri"] for record in results.outputs)
    assert uris == sorted(
        [origin.url(f"/o/{'nested/' if i % 2 else ''}{s.name}") for i, s in enumerate(samples)]
        + [f"s3://photos/2024/{s.name}" for s in samples]
    )
