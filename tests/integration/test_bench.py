"""The bench: the short mode runs end to end (tiny model, about a minute; speed is reported, not asserted),
and its end-to-end driver survives failing workers: it ends the row with the error, never hangs, and never
reports a failure as throughput (those tests use a local Tansu broker, a single binary as on the GPU machine).
The host-cost section's quick form prints its stage table and writes its JSON (its figures are not asserted).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.kafka_helpers import KAFKA_CLIENTS, clean_env
from worker.devtools.bench.pipeline import Workload, bench_worker
from worker.devtools.bench.report import Report
from worker.devtools.bench.stages import HOST_STAGES, NATIVE_CLIENT, STAND_IN_STAGES
from worker.devtools.brokers import TansuBroker
from worker.devtools.samples import jpeg_corpus

pytestmark = pytest.mark.integration


def test_quick_bench_prints_a_table_and_writes_json(kafka_bootstrap, tmp_path):
    output = tmp_path / "bench.json"
    env = clean_env()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "bench",
            "--quick",
            "--exactly-once",
            "--bootstrap-servers",
            kafka_bootstrap,
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| ratio | end-to-end / baseline |" in result.stdout
    assert "by reference (+200 ms per image)" in result.stdout
    report = json.loads(output.read_text())
    sections = {row["section"] for row in report["rows"]}
    assert sections == {"model", "copy", "preprocess", "bare", "end-to-end"}
    assert all(row["images_per_s"] > 0 for row in report["rows"])
    # The steady-state twin of the by-reference ratio needs rows long enough to have a steady state.
    steady = "by reference / by bytes, steady (10-90% of the backlog)"
    assert set(report["ratios"]) - {steady} == {
        "end-to-end / bare work",
        "end-to-end / baseline",
        "by reference / by bytes",
        "exactly-once / at-least-once",
    }
    assert report["machine"]["cpu_cores"] >= 1


CORPUS = jpeg_corpus(48, 160, 120)


@pytest.fixture(scope="module")
def tansu() -> Iterator[str]:
    with TansuBroker() as broker:
        yield broker.bootstrap_servers


def _work(**extra: Any) -> Workload:
    return Workload(CORPUS, batch_size=16, decode_workers=1, resize="torch", partitions=2, **extra)


@pytest.mark.timeout(60)
def test_a_model_that_fails_at_start_up_ends_the_row_within_seconds(tansu, tiny_embedder):
    embedder = tiny_embedder.view()

    def broken_compile(mode: str, batch_size: int) -> float:
        raise RuntimeError("compiler exploded")

    embedder.compile = broken_compile
    report = Report()
    started = time.monotonic()
    rate = bench_worker(report, embedder, _work(), tansu, compile_mode="inductor")
    assert time.monotonic() - started < 20  # the backlog fill included; the old driver waited forever
    assert rate is None
    row = report.rows[-1]
    assert row.failed is not None and "compiler exploded" in row.failed
    assert row.images_per_s == 0


def test_a_forward_pass_that_always_raises_is_a_failed_row_not_a_fast_one(tansu, tiny_embedder):
    embedder = tiny_embedder.view()

    def broken_launch(pixels: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    embedder.launch = broken_launch
    report = Report()
    rate = bench_worker(report, embedder, _work(), tansu)
    row = report.rows[-1]
    assert not rate  # the old driver counted dead letters as done and reported them as images/s
    assert row.images_per_s == 0
    assert row.detail["dead_letters"] == len(CORPUS)
    assert row.failed is not None and "dead letter" in row.failed


def test_a_worker_that_hangs_ends_the_row_at_its_deadline(tansu, tiny_embedder):
    embedder = tiny_embedder.view()
    release = threading.Event()
    real_launch = embedder.launch

    def stuck_launch(*args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        return real_launch(*args, **kwargs)

    embedder.launch = stuck_launch
    report = Report()
    started = time.monotonic()
    try:
        rate = bench_worker(report, embedder, _work(timeout_s=4.0), tansu)
    finally:
        release.set()
    assert time.monotonic() - started < 20
    assert rate is None
    row = report.rows[-1]
    assert row.failed is not None and "timed out" in row.failed


@KAFKA_CLIENTS
def test_a_healthy_worker_counts_embedded_records_and_no_dead_letters(tansu, tiny_embedder, kafka_client):
    report = Report()
    rate = bench_worker(report, tiny_embedder, _work(kafka_client=kafka_client), tansu)
    row = report.rows[-1]
    assert rate and rate > 0 and row.failed is None
    assert row.detail["kafka_client"] == kafka_client
    assert row.detail["embedded"] == len(CORPUS) and row.detail["dead_letters"] == 0
    assert row.detail["device_decode_fallbacks"] == 0


@pytest.mark.timeout(120)
@KAFKA_CLIENTS
def test_quick_host_cost_prints_the_stage_table_and_writes_json(tansu, tmp_path, kafka_client):
    output = tmp_path / "host-cost.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "bench",
            "--sections",
            "host-cost",
            "--quick",
            "--kafka-client",
            kafka_client,
            "--bootstrap-servers",
            tansu,
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        env=clean_env(),
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        "| host cost per image | CPU us | GIL us | GIL us while on CPU | share of host GIL |" in result.stdout
    )
    assert "| **host total** (all but the stand-ins) |" in result.stdout
    assert f"| {kafka_client} floor: consumer |" in result.stdout
    assert "implied ceiling:" in result.stdout
    report = json.loads(output.read_text())
    assert {row["section"] for row in report["rows"]} == {"host-cost"}
    assert all(row["failed"] is None and row["images_per_s"] > 0 for row in report["rows"])
    facts = report["host_cost"]
    assert [row["stage"] for row in facts["stages"]] == [*HOST_STAGES, *STAND_IN_STAGES]
    assert all(0 <= row["gil_on_cpu_us"] <= row["gil_us"] for row in facts["stages"])
    assert all(row["gil_on_cpu_us"] <= row["cpu_us"] for row in facts["stages"])
    assert facts["host"]["gil_us"] > 0 and facts["implied_ceiling_images_per_s"] > 0
    assert facts["implied_ceiling_on_cpu_images_per_s"] >= facts["implied_ceiling_images_per_s"]
    assert set(facts["kafka_python_floor"]) == {"consumer", "producer", "gil_us_own_code"}
    assert facts["images"] == 400 and facts["payload_bytes"] == 80_000
    # librdkafka's fetches and produce requests run on its native threads: counted by their CPU, and
    # none of kafka-python's frames are left; with kafka-python there are no such threads.
    native = next(row for row in facts["stages"] if row["stage"] == NATIVE_CLIENT)
    if kafka_client == "librdkafka":
        assert native["cpu_us"] > 0 and facts["kafka_python_floor"]["gil_us_own_code"] == 0
    else:
        assert native["cpu_us"] == 0 and facts["kafka_python_floor"]["gil_us_own_code"] > 0


@pytest.mark.timeout(120)
def test_fetch_cost_measures_a_fetch_without_a_broker_or_a_model(tmp_path):
    output = tmp_path / "fetch-cost.json"
    command = [sys.executable, "-m", "worker.cli", "bench", "--sections", "fetch-cost", "--fetches", "400"]
    command += ["--images", "8", "--output", str(output)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=110, env=clean_env(), check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| fetch-cost | 400 fetches, 128 at once, no added latency |" in result.stdout
    [row] = json.loads(output.read_text())["rows"]
    assert row["failed"] is None and row["images_per_s"] > 0
    assert row["detail"]["worker_cpu_ms_per_fetch"] > 0 and row["detail"]["origin_cpu_ms_per_fetch"] > 0
    pictures = jpeg_corpus(8, 500, 375)  # the bench's corpus for --images 8; 400 fetches cycle it 50 times
    mean_kib = round(sum(len(picture) for picture in pictures) / len(pictures) / 1024, 1)
    assert row["detail"]["mean_kib"] == mean_kib, "every body came whole"


@pytest.mark.timeout(180)
def test_quick_host_ceiling_measures_the_worker_and_the_bare_loop_of_both_clients(tansu, tmp_path):
    output = tmp_path / "host-ceiling.json"
    result = subprocess.run(
        [
            *[sys.executable, "-m", "worker.cli", "bench", "--sections", "host-ceiling", "--quick"],
            *["--bootstrap-servers", tansu, "--output", str(output)],
        ],
        capture_output=True,
        text=True,
        timeout=170,
        env=clean_env(),
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    rows = {row["case"]: row for row in report["rows"] if row["section"] == "host-ceiling"}
    assert set(rows) == {
        f"{client}: {loop}"
        for client in ("kafka-python", "librdkafka")
        for loop in ("worker, null model", "bare pass-through loop")
    }
    assert all(row["failed"] is None and row["images_per_s"] > 0 for row in rows.values())
    assert all(row["detail"]["records"] == 200 for row in rows.values())
    assert set(report["ratios"]) == {
        "host ceiling: worker / bare loop, kafka-python",
        "host ceiling: worker / bare loop, librdkafka",
        "host ceiling: librdkafka worker / kafka-python worker",
    }
    assert "| ratio | host ceiling: librdkafka worker / kafka-python worker |" in result.stdout
