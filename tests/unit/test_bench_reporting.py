"""The bench's reporting: GPU busy averaged over a row's steady state, results saved after every row, and the
summary table that ends ``.ci/gpu-bench`` (failed rows named, CPU stand-in samples never counted as GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from worker.devtools.bench.gpu_busy import HEADER, mean_busy
from worker.devtools.bench.pipeline import _SteadyWindow
from worker.devtools.bench.report import Report
from worker.devtools.bench.summary import summary


def _samples(tmp_path: Path, rows: list[tuple[float, float]]) -> Path:
    path = tmp_path / "gpu-busy.csv"
    lines = [",".join(HEADER)] + [f"{when},{busy},1000,nvml" for when, busy in rows]
    path.write_text("\n".join(lines) + "\n1796000009.5,4")  # the sampler killed mid-line
    return path


def test_gpu_busy_is_the_mean_over_the_window_only(tmp_path):
    path = _samples(tmp_path, [(100.0, 10), (101.0, 80), (101.5, 90), (102.0, 100), (103.0, 5)])
    assert mean_busy(path, 100.5, 102.0) == {
        "gpu_busy": "90%",
        "gpu_busy_samples": 3,
        "gpu_busy_source": "nvml",
    }


def test_a_window_with_fewer_than_two_samples_says_so_instead_of_guessing(tmp_path):
    path = _samples(tmp_path, [(100.0, 10), (101.0, 80)])
    assert mean_busy(path, 100.5, 100.9)["gpu_busy"] == "n/a"
    assert mean_busy(tmp_path / "missing.csv", 0, 1e12)["gpu_busy"] == "n/a"


def test_the_sampler_writes_labelled_samples_until_terminated(tmp_path):
    output = tmp_path / "busy.csv"
    sampler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.devtools.bench.gpu_busy",
            "--output",
            str(output),
            "--interval-s",
            "0.1",
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not output.exists() or output.read_text().count("\n") < 4):
            time.sleep(0.05)
    finally:
        sampler.terminate()
        assert sampler.wait(timeout=10) == 0
    rows = output.read_text().splitlines()
    assert rows[0] == ",".join(HEADER) and len(rows) >= 4
    assert rows[1].split(",")[3] in {"nvml", "nvidia-smi", "cpu-stand-in"}


def test_the_report_is_on_disk_after_every_row(tmp_path):
    output = tmp_path / "bench.json"
    report = Report(output=output)
    report.add("model", "batch 8, forward pass", 100.0, dtype="bfloat16")
    assert [r["case"] for r in json.loads(output.read_text())["rows"]] == ["batch 8, forward pass"]
    report.add("end-to-end", "clip-worker, batch 8", 0.0, failed="the worker died: boom")
    assert json.loads(output.read_text())["rows"][1]["failed"] == "the worker died: boom"


def test_the_summary_names_failed_rows_and_ignores_busy_figures_not_from_a_gpu():
    def worker_row(
        case: str, rate: float, busy: str, source: str, failed: str | None = None
    ) -> dict[str, Any]:
        detail = {"gpu_busy": busy, "gpu_busy_source": source, "model_busy": "50%", "dead_letters": 0}
        return {
            "section": "end-to-end",
            "case": case,
            "images_per_s": rate,
            "detail": detail,
            "failed": failed,
        }

    report = {
        "machine": {"gpu": None, "device": "cpu", "dtype": "float32", "batch_size": 32},
        "rows": [
            worker_row("clip-worker, batch 32", 400.0, "95%", "cpu-stand-in"),
            worker_row(
                "clip-worker, batch 32, --compile cuda-graphs", 0.0, "n/a", "nvml", "timed out after 90s"
            ),
        ],
    }
    text = summary(report, None)
    assert (
        "| FAILED ROW: end-to-end: clip-worker, batch 32, --compile cuda-graphs | timed out after 90s |"
        in text
    )
    assert "busy (cpu-stand-in, not a GPU) 95%" in text
    assert "| target: GPU busy >= 90% | MISSED (best 0%) |" in text
    assert "CPU rehearsal" in text


def test_the_steady_rate_counts_only_between_a_tenth_and_nine_tenths_of_the_backlog(monkeypatch):
    clock = iter([10.0, 11.0, 12.0, 14.0, 14.5])
    monkeypatch.setattr("worker.devtools.bench.pipeline.time.time", lambda: next(clock))
    window = _SteadyWindow(1000)
    for done in (50, 100, 500, 900, 1000):  # 100 done at 11 s, 900 at 14 s
        window.see(done)
    assert window.rate() == round(800 / 3.0, 1)
    short = _SteadyWindow(1000)
    monkeypatch.setattr("worker.devtools.bench.pipeline.time.time", lambda: 20.0)
    short.see(1000)  # both marks at once: no steady state to tell
    assert short.rate() is None
