"""The short bench mode runs end to end (tiny model, about a minute); speed is reported, not asserted."""

import json
import subprocess
import sys

import pytest

from tests.support.kafka_helpers import clean_env

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
    report = json.loads(output.read_text())
    sections = {row["section"] for row in report["rows"]}
    assert sections == {"model", "preprocess", "bare", "end-to-end"}
    assert all(row["images_per_s"] > 0 for row in report["rows"])
    assert set(report["ratios"]) == {
        "end-to-end / bare work",
        "end-to-end / baseline",
        "exactly-once / at-least-once",
    }
    assert report["machine"]["cpu_cores"] >= 1
